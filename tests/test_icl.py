"""Unsupervised ICL: demonstration sampling, voting, and the whole run on a tiny model."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from joint_inference.core.errors import ConfigError
from joint_inference.methods.icl import balanced_support, class_weighted_support, majority_vote
from tests.conftest import REPO, compose, torchrun_two

# ----------------------------------------------------------------------------- sampling and voting


@pytest.mark.parametrize("n,counts", [(16, [50, 50]), (16, [30, 30, 30]), (7, [5, 5, 5, 5]), (8, [2, 40, 40])])
def test_balanced_support_counts(n, counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    rng = np.random.default_rng(0)
    for trial in range(50):
        exclude = trial % len(labels)
        chosen = balanced_support(labels, n, len(counts), rng, exclude=[exclude])
        assert len(chosen) == n and len(set(chosen)) == n and exclude not in chosen
        per_class = np.bincount(labels[chosen], minlength=len(counts))
        quota = n // len(counts)
        short = [c for c, size in enumerate(counts) if size - (labels[exclude] == c) < quota + 1]
        for c in range(len(counts)):
            if c not in short:  # classes with enough examples get their share, +1 for leftovers
                assert quota <= per_class[c] <= quota + 1 + (n - quota * len(counts)) * bool(short)
        assert per_class.sum() == n


def test_balanced_support_leftovers_are_random_and_order_shuffled():
    labels = np.repeat(np.arange(3), 20)
    rng = np.random.default_rng(1)
    extra = Counter()
    firsts = Counter()
    for _ in range(300):
        chosen = balanced_support(labels, 4, 3, rng)  # 1 each + 1 leftover
        extra[int(np.argmax(np.bincount(labels[chosen], minlength=3)))] += 1
        firsts[int(labels[chosen[0]])] += 1
    assert all(v > 60 for v in extra.values()) and len(extra) == 3
    assert all(v > 60 for v in firsts.values())


def test_balanced_support_rejects_large_n_only_without_replacement():
    labels = np.array([0] * 10 + [2] * 3)
    with pytest.raises(ConfigError, match="N=13"):
        balanced_support(labels, 13, 3, np.random.default_rng(0), exclude=[0])
    assert len(balanced_support(labels, 13, 3, np.random.default_rng(0), exclude=[0], protocol="original")) == 13
    with pytest.raises(ConfigError, match="unknown protocol"):
        balanced_support(labels, 4, 3, np.random.default_rng(0), protocol="paper")


def mean_class_counts(labels, n, num_classes, protocol, trials=3000, exclude=()):
    """(mean, standard error) over ``trials`` draws of the demonstrations per class."""
    rng = np.random.default_rng(7)
    counts = np.array([np.bincount(labels[balanced_support(labels, n, num_classes, rng, exclude, protocol)],
                                   minlength=num_classes) for _ in range(trials)])
    return counts.mean(0), counts.std(0) / np.sqrt(trials)


def reference_class_means(sizes, n, replace):
    """Expected demonstrations per class, written from the original's rule: every class's quota is
    n/K on average (n//K plus a share of the leftovers); a class with examples gives its quota (all
    it has when short, without replacement); the missing slots are uniform draws from the pool."""
    sizes = np.asarray(sizes, dtype=float)
    quota = n / len(sizes)
    given = np.where(sizes > 0, quota if replace else np.minimum(quota, sizes), 0.0)
    missing = n - given.sum()
    if replace:
        return given + missing * sizes / sizes.sum()
    left = sizes - given  # the fill never redraws a chosen example
    return given + missing * left / left.sum()


@pytest.mark.parametrize("protocol", ["clean", "original"])
@pytest.mark.parametrize("sizes,n", [
    ([600, 100, 100, 1200, 0, 0], 16),  # zero-shot never predicts two of six classes (TREC): empty slots are uniform
    ([2, 40, 40], 9),                   # a class short of its quota: the protocols differ
    ([30, 30, 30], 7),
])
def test_balanced_support_class_frequencies_match_the_reference(protocol, sizes, n):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    got, stderr = mean_class_counts(labels, n, len(sizes), protocol)
    want = reference_class_means(sizes, n, replace=protocol == "original")
    assert np.all(np.abs(got - want) <= 5 * stderr + 0.02), (got, want)
    if sizes[0] == 600:  # the figures quoted for the original (600/100/100/1200 examples, N=16)
        np.testing.assert_allclose(got[:4], [4.27, 2.93, 2.93, 5.87], atol=0.15)


def test_protocols_differ_in_replacement_and_self_demonstration():
    labels = np.repeat(np.arange(3), [4, 4, 4])
    rng = np.random.default_rng(3)
    clean = [balanced_support(labels, 9, 3, rng, exclude=[0]) for _ in range(500)]
    original = [balanced_support(labels, 9, 3, rng, exclude=[0], protocol="original") for _ in range(500)]
    assert all(len(set(c)) == 9 and 0 not in c for c in clean)
    assert any(len(set(o)) < 9 for o in original)  # with replacement
    self_rate = np.mean([0 in o for o in original])  # P(query 0 among its 3 draws from class 0) = 1 - (3/4)^3
    assert abs(self_rate - (1 - 0.75 ** 3)) < 0.08


def test_majority_vote_ties_are_random_or_go_to_the_smallest_label():
    assert majority_vote(np.array([1, 1, 0]), 3, np.random.default_rng(0)) == 1
    seen = {majority_vote(np.array([0, 2, 2, 0, 1]), 3, np.random.default_rng(s)) for s in range(40)}
    assert seen == {0, 2}
    original = {majority_vote(np.array([2, 0, 0, 2, 1]), 3, np.random.default_rng(s), "original") for s in range(40)}
    assert original == {0}
    assert majority_vote(np.array([3, 1, 3, 1]), 4, np.random.default_rng(0), "original") == 1


# ----------------------------------------------------------------------------- whole runs


def icl_config(model_dir, data_root, out_dir, *extra):
    return compose("unsupervised_icl_llm", [
        f"model.pretrained={model_dir}", "model.embedded=null", "model.name=tiny_llama", "dataset=sst2",
        f"dataset.data_root={data_root}", "dataset.num_examples=24", "N=3", "T=2", "num_repeats=3",
        "device=cpu", "forward_batch_size=5", "progress=false", f"output_dir={out_dir}", *extra])


def test_run_writes_results_and_predictions(tiny_llama_dir, tiny_sst2_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    results = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", "save_predictions=true"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["num_train"] == 16 and saved["num_test"] == 8
    assert set(saved) >= {"task", "model", "num_train", "num_test", "zero_shot", "supervised_icl", "rounds", "timing"}
    assert [r["round"] for r in saved["rounds"]] == [1, 2]
    assert saved["timing"]["prompts_scored"] == 24 + 8 * 3 + 2 * 24 * 3
    table = (tmp_path / "run" / "results.md").read_text()
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| unsupervised")] == [
        "| unsupervised ICL, round 1", "| unsupervised ICL, round 2"]
    assert (tmp_path / "run" / "rounds.png").stat().st_size > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert Counter(r["split"] for r in rows) == {"train": 16, "test": 8}
    assert set(rows[0]) == {"split", "sentence", "label", "zero_shot", "rounds"} and len(rows[0]["rounds"]) == 2
    test_rows = [r for r in rows if r["split"] == "test"]
    acc = np.mean([r["rounds"][-1] == r["label"] for r in test_rows])
    assert acc == pytest.approx(saved["rounds"][-1]["test_accuracy"])


def test_original_protocol_is_one_setting_away_and_recorded(tiny_llama_dir, tiny_sst2_root, tmp_path):
    """protocol=original runs (N may exceed the pool: draws are with replacement) and says which
    protocol ran, in results.json and in the run's fingerprint."""
    from joint_inference.runs.root import run_icl as run

    clean = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "clean"))
    original = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "original", "protocol=original"))
    assert clean["settings"]["protocol"] == "clean" and original["settings"]["protocol"] == "original"
    assert clean["zero_shot"] == original["zero_shot"]
    state = json.loads((tmp_path / "original" / "state.json").read_text())
    assert json.dumps(state).count('"protocol": "original"') >= 1
    large = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "large", "protocol=original", "N=20", "T=1"))
    assert len(large["rounds"]) == 1
    with pytest.raises(ConfigError, match="N=20"):
        run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "large_clean", "N=20", "T=1"))


def test_run_is_reproducible_and_ignores_gold_labels(tiny_llama_dir, tiny_sst2_root, tmp_path, monkeypatch):
    """Same seed -> same predictions; scrambling the gold labels of the same sample changes the
    accuracies and the supervised baseline, never a zero-shot or unsupervised prediction."""
    import joint_inference.runs.root as root
    from joint_inference.runs.root import run_icl as run

    def predictions(name):
        results = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / name, "save_predictions=true"))
        rows = [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        return results, [(r["split"], r["sentence"], r["zero_shot"], r["rounds"]) for r in rows], [r["label"] for r in rows]

    first, first_preds, first_gold = predictions("a")
    again, again_preds, _ = predictions("b")
    assert first_preds == again_preds and first == {**again, "timing": first["timing"]}
    assert len({p[2] for p in first_preds}) == 2 and len({tuple(p[3]) for p in first_preds}) > 1  # not constant

    real_load = root.load_data

    def scrambled(*args, **kwargs):
        data = real_load(*args, **kwargs)
        rng = np.random.default_rng(123)
        data.train_labels = rng.integers(0, 2, len(data.train_labels))
        data.test_labels = rng.integers(0, 2, len(data.test_labels))
        return data

    monkeypatch.setattr(root, "load_data", scrambled)
    _, scrambled_preds, scrambled_gold = predictions("c")
    assert scrambled_gold != first_gold
    assert scrambled_preds == first_preds


def test_gold_labels_never_reach_a_prompt(tiny_llama_dir, tiny_sst2_root, tmp_path, monkeypatch):
    """Every prompt's demonstration labels equal the current pseudo-labels (or, for the
    supervised baseline only, the gold labels) -- recorded at the scorer boundary."""
    import joint_inference.methods.icl as icl
    from joint_inference.runs.root import run_icl as run

    calls = []
    original = icl.icl_predict

    def spy(scorer, pool, pool_labels, queries, **kw):
        calls.append((kw["rng_key"], np.array(pool_labels)))
        return original(scorer, pool, pool_labels, queries, **kw)

    monkeypatch.setattr("joint_inference.methods.uicl.icl_predict", spy)
    run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", "save_predictions=true"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    gold = np.array([r["label"] for r in train])
    zero_shot = np.array([r["zero_shot"] for r in train])
    round1 = np.array([r["rounds"][0] for r in train])
    by_stage = {}
    for key, labels in calls:
        by_stage.setdefault(key[1], []).append(labels)
    assert all((lab == gold).all() for lab in by_stage[0])  # supervised baseline
    assert all((lab == zero_shot).all() for lab in by_stage[1])  # round 1 uses zero-shot labels
    assert all((lab == round1).all() for lab in by_stage[2])  # round 2 uses round-1 labels


def test_a_run_interrupted_inside_a_stage_redoes_only_the_unfinished_split(tiny_llama_dir, tiny_sst2_root, tmp_path,
                                                                         monkeypatch):
    """Round 2 stops after scoring its test prompts: the restart scores round 2's unlabelled pool and
    nothing else, and the results equal an uninterrupted run's."""
    import joint_inference.methods.uicl as uicl
    from joint_inference.runs.root import run_icl as run
    from joint_inference.scoring.scorer import Scorer

    full = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "full"))
    original_predict, original_score = uicl.icl_predict, Scorer.label_logprobs

    def stop_at_round_2_train(*args, **kw):
        if kw["rng_key"][1:] == (2, 1):  # round 2, split "train" (after "test")
            raise KeyboardInterrupt
        return original_predict(*args, **kw)

    monkeypatch.setattr(uicl, "icl_predict", stop_at_round_2_train)
    with pytest.raises(KeyboardInterrupt):
        run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "results.json").exists()
    stages = json.loads((tmp_path / "resumed" / "state.json").read_text())["stages"]
    assert list(stages)[-2:] == ["round_1/train", "round_2/test"]

    monkeypatch.setattr(uicl, "icl_predict", original_predict)
    scored = []

    def count(self, prompts, *args, **kw):
        scored.extend([kw["desc"]] * len(prompts))
        return original_score(self, prompts, *args, **kw)

    monkeypatch.setattr(Scorer, "label_logprobs", count)
    resumed = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "resumed"))
    assert scored == ["round 2/2 [train]"] * 16 * 3  # the pool's 16 queries, 3 votes each
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(resumed) == strip(full)
    assert resumed["timing"]["prompts_scored"] == full["timing"]["prompts_scored"]
    with pytest.raises(ConfigError, match="N"):
        run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "resumed", "N=2"))


def test_bad_input_errors(tiny_llama_dir, tiny_sst2_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    with pytest.raises(ConfigError, match="larger than the unlabelled pool"):
        run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "a", "N=16"))
    with pytest.raises(ConfigError, match="label set has 6 names"):
        run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "b", "labelset=trec"))
    with pytest.raises(ConfigError, match="needs field"):
        run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "c", "template=ag_news"))
    with pytest.raises(ConfigError, match="label_mode='bag' is not one of auto, first"):
        run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "d", "label_mode=bag"))
    with pytest.raises(ConfigError, match="could not load model"):
        run(icl_config(tmp_path / "no_such_model", tiny_sst2_root, tmp_path / "e"))
    assert not any((tmp_path / d / "results.json").exists() for d in "abcde")


@pytest.mark.slow
def test_cli_exit_codes_and_multirun(tiny_llama_dir, tiny_sst2_root, tmp_path):
    """The real command line: a clean error with a non-zero exit, and a -m sweep."""
    base = [sys.executable, str(REPO / "unsupervised_icl_llm.py"), f"model.pretrained={tiny_llama_dir}",
            "model.embedded=null", "model.name=tiny", f"dataset.data_root={tiny_sst2_root}", "dataset.num_examples=24",
            "N=3", "T=1", "num_repeats=1", "device=cpu", "progress=false"]
    bad = subprocess.run(base + ["dataset=no_such_task", f"hydra.run.dir={tmp_path / 'bad'}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "no_such_task" in bad.stderr and "sst2" in bad.stderr
    big = subprocess.run(base + ["N=40", f"hydra.run.dir={tmp_path / 'big'}"], capture_output=True, text=True, cwd=tmp_path)
    assert big.returncode == 2 and "error: N=40" in big.stderr and "Traceback" not in big.stderr
    sweep = subprocess.run(base[:2] + ["-m"] + base[2:] + ["seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr
    results = sorted(Path(tmp_path / "sweep").glob("*/results.json"))
    assert len(results) == 2 and {json.loads(p.read_text())["settings"]["seed"] for p in results} == {0, 1}


def test_shared_support_with_blocks_of_one_equals_per_query(tiny_llama_dir, tiny_sst2_root, tmp_path):
    """Blocks of one query draw exactly the per-query demonstrations; the key/value-cached
    scoring must then reproduce every prediction."""
    from joint_inference.runs.root import run_icl as run

    def predictions(name, *extra):
        results = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / name, "save_predictions=true", *extra))
        rows = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        return results, [(r["zero_shot"], r["rounds"]) for r in map(json.loads, rows)]

    per_query, per_query_preds = predictions("per_query")
    shared, shared_preds = predictions("shared", "support_sampling=shared", "block_size=1")
    assert shared_preds == per_query_preds
    assert len({p[0] for p in shared_preds}) == 2 and len({tuple(p[1]) for p in shared_preds}) > 1  # not constant
    assert shared["settings"]["support_sampling"] == "shared"
    blocks, _ = predictions("blocks", "support_sampling=shared", "block_size=4")
    assert blocks["timing"]["prompts_scored"] == per_query["timing"]["prompts_scored"]
    with pytest.raises(ConfigError, match="block_size=0"):
        run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "zero", "support_sampling=shared", "block_size=0"))
    with pytest.raises(ConfigError, match="support_sampling"):
        run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "bad", "support_sampling=global"))


@pytest.mark.slow
def test_shard_map_splits_work_over_processes_and_gathers_in_order(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(
        "import json\n"
        "import torch\n"
        "from joint_inference.core.distributed import process_state, shard_map\n"
        "rank = process_state().process_index\n"
        "out = shard_map(lambda idx: [torch.tensor([i, rank]) for i in idx], 7)\n"
        "open(f'rank{rank}.json', 'w').write(json.dumps([t.tolist() for t in out]))\n")
    done = subprocess.run([*torchrun_two(), str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in (0, 1):  # every process holds all items, in order, each computed by one rank
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [[i, i % 2] for i in range(7)]


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["per_query", "shared"])
def test_two_processes_shard_queries_with_the_same_predictions(tiny_llama_dir, tiny_sst2_root, tmp_path, sampling):
    """Two CPU processes (torchrun; `accelerate launch` sets up GPU processes the same way) split
    the prompts and gather the scores: the predictions equal one process's under the same seed."""
    from joint_inference.runs.root import run_icl as run

    args = [f"model.pretrained={tiny_llama_dir}", "model.embedded=null", "model.name=tiny", "model.dtype=float32",
            f"dataset.data_root={tiny_sst2_root}", "dataset.num_examples=24", "N=3", "T=2", "num_repeats=3",
            "progress=false", "save_predictions=true", f"support_sampling={sampling}", "block_size=3"]
    run(compose("unsupervised_icl_llm", args + ["device=cpu", f"output_dir={tmp_path / 'one'}"]))
    launched = subprocess.run(
        [*torchrun_two(), str(REPO / "unsupervised_icl_llm.py"), *args, f"hydra.run.dir={tmp_path / 'two'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = (tmp_path / "one" / "predictions.jsonl").read_text()
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == one
    rows = [json.loads(line) for line in one.splitlines()]
    assert len({r["zero_shot"] for r in rows}) == 2 and len({tuple(r["rounds"]) for r in rows}) > 1  # not constant


def test_class_weighted_support_draws_as_the_originals_weighted_random_sampler():
    """Each demonstration: a class present in the pseudo-labels uniformly, then one of its examples; the
    frequencies of 60,000 draws match the exact probabilities and those of torch's WeightedRandomSampler with
    the original's weights (1 / class count), the sampler its vision script uses."""
    import torch
    from torch.utils.data import WeightedRandomSampler

    labels = np.array([0] * 6 + [2] * 2 + [3] * 1)  # classes 1 and 4 are absent
    exact = 1 / 3 / np.bincount(labels)[labels]
    assert exact.sum() == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    ours = np.bincount(np.concatenate([class_weighted_support(labels, 6, rng) for _ in range(10_000)]),
                       minlength=len(labels)) / 60_000
    torch.manual_seed(0)
    theirs = np.bincount(list(WeightedRandomSampler((1.0 / np.bincount(labels)[labels]).tolist(), 60_000)),
                         minlength=len(labels)) / 60_000
    se = np.sqrt(exact * (1 - exact) / 60_000)
    assert np.all(np.abs(ours - exact) < 5 * se) and np.all(np.abs(theirs - exact) < 5 * se)
    counts = [len(set(labels[class_weighted_support(labels, 3, rng)])) for _ in range(2000)]
    assert min(counts) == 1  # no quotas: a prompt of 3 can miss classes present
