"""MMLU as the original ran it (docs/protocol.md §8): every subject in one command with one model load,
each subject transductive, the supervised baseline on the validation split, macro and micro
averages, resumption per subject; and (integration) all 57 real subjects on a tiny model."""
from __future__ import annotations

import json
import time
from collections import defaultdict

import numpy as np
import pytest

from joint_inference.core.errors import ConfigError
from joint_inference.scoring.scorer import Scorer
from tests.conftest import SHARED_DATA, WORDS, compose, one_torch_thread, task_data, write_jsonl

# subject: (test questions, validation questions); abstract_algebra's validation split is smaller than N
SIZES = {"abstract_algebra": (6, 2), "anatomy": (9, 4), "virology": (5, 3)}


@pytest.fixture(autouse=True)
def on_one_thread():
    with one_torch_thread():
        yield


@pytest.fixture()
def mmlu_root(tmp_path):
    """A DATA_ROOT holding mmlu/{test,validation}.jsonl in the hub's schema, subjects interleaved."""
    rng = np.random.default_rng(0)
    for split, column in (("test", 0), ("validation", 1)):
        rows = [{"question": f"{split} {subject} {i} " + " ".join(rng.choice(WORDS, 5)),
                 "subject": subject, "choices": list(rng.choice(WORDS, 4)), "answer": i % 4}
                for subject, sizes in SIZES.items() for i in range(sizes[column])]
        write_jsonl(tmp_path / "data" / "mmlu" / f"{split}.jsonl", [rows[i] for i in rng.permutation(len(rows))])
    return tmp_path / "data"


def read_rows(root, split):
    return [json.loads(line) for line in (root / "mmlu" / f"{split}.jsonl").read_text().splitlines()]


def mmlu_config(model_dir, data_root, out_dir, *extra):
    return compose("unsupervised_icl_llm", [
        f"model.pretrained={model_dir}", "model.embedded=null", "model.name=tiny_llama", "dataset=mmlu",
        f"dataset.data_root={data_root}", f"dataset.subjects=[{','.join(SIZES)}]", "N=3", "T=2", "num_repeats=2",
        "device=cpu", "forward_batch_size=8", "progress=false", f"output_dir={out_dir}", *extra])


@pytest.fixture()
def scored(monkeypatch):
    """Every scored prompt as (stage description, prompt), and the scorer's encoder."""
    calls, seen = [], {}
    original = Scorer.label_logprobs

    def spy(self, prompts, labels, read="query", desc=None):
        seen["encoder"] = self.encoder
        calls.extend((desc, prompt) for prompt in prompts)
        return original(self, prompts, labels, read, desc)

    monkeypatch.setattr(Scorer, "label_logprobs", spy)
    return calls, seen


@pytest.fixture()
def model_loads(monkeypatch):
    """How many times a run loads the model, and (``tokenizer_loads``) its tokenizer."""
    import joint_inference.runs.root as root

    loads, original = [], root.load_model
    monkeypatch.setattr(root, "load_model", lambda *a, **kw: loads.append(1) or original(*a, **kw))
    return loads


@pytest.fixture()
def tokenizer_loads(monkeypatch):
    import joint_inference.runs.root as root

    loads, original = [], root.load_tokenizer
    monkeypatch.setattr(root, "load_tokenizer", lambda *a, **kw: loads.append(1) or original(*a, **kw))
    return loads


def test_each_subject_is_transductive_with_validation_demonstrations(tiny_llama_dir, mmlu_root, tmp_path, scored,
                                                                    model_loads, tokenizer_loads):
    """At the scorer boundary: every query is a test question; supervised demonstrations are validation
    questions of the query's subject, unsupervised ones other test questions of that subject. The
    template keeps the subject's underscores."""
    from joint_inference.runs.root import run_icl as run

    calls, seen = scored
    results = run(mmlu_config(tiny_llama_dir, mmlu_root, tmp_path / "run"))
    assert len(model_loads) == len(tokenizer_loads) == 1  # the rows of every subject checked with one tokenizer
    encoder = seen["encoder"]
    rows = {split: read_rows(mmlu_root, split) for split in ("test", "validation")}
    origin = {encoder.encode(row): (split, row["subject"]) for split in rows for row in rows[split]}
    queries = defaultdict(set)
    for desc, prompt in calls:
        *demonstrations, query = prompt
        split, subject = origin[query]
        assert split == "test"
        stage = desc.split(" [")[0]
        queries[subject, stage].add(query)
        if stage == "supervised ICL":
            assert {origin[d] for d in demonstrations} == {("validation", subject)}
        elif stage.startswith("round"):
            assert {origin[d] for d in demonstrations} == {("test", subject)} and query not in demonstrations
        else:
            assert stage == "zero-shot" and not demonstrations
    for subject, (num_test, _) in SIZES.items():
        test_questions = {encoder.encode(r) for r in rows["test"] if r["subject"] == subject}
        assert all(queries[subject, s] == test_questions for s in ("zero-shot", "supervised ICL", "round 1/2", "round 2/2"))
        assert results["subjects"][subject]["num_test"] == num_test
    algebra_query = next(iter(queries["abstract_algebra", "zero-shot"]))
    assert "questions (with answers) about abstract_algebra.\n" in encoder.tokenizer.decode(algebra_query.prefix)

    data = task_data(mmlu_config(tiny_llama_dir, mmlu_root, tmp_path / "run", "dataset.subject=anatomy"))
    assert data.transductive and data.train is data.test
    assert data.test == [r for r in rows["test"] if r["subject"] == "anatomy"]
    assert data.supervised_pool == [r for r in rows["validation"] if r["subject"] == "anatomy"]
    assert data.test_labels.tolist() == [r["answer"] for r in data.test]


def test_macro_and_micro_averages_equal_the_per_subject_results(tiny_llama_dir, mmlu_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    results = run(mmlu_config(tiny_llama_dir, mmlu_root, tmp_path / "run", "save_predictions=true"))
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == json.loads(json.dumps(results))
    per_subject = {s: json.loads((tmp_path / "run" / "subjects" / s / "results.json").read_text()) for s in SIZES}
    predictions = [json.loads(line) for s in SIZES
                   for line in (tmp_path / "run" / "subjects" / s / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == results["num_test"] == sum(n for n, _ in SIZES.values())

    def macro(accuracy_of):
        return np.mean([accuracy_of(per_subject[s]) for s in SIZES])

    assert results["macro"]["zero_shot"] == pytest.approx(macro(lambda r: r["zero_shot"]["test_accuracy"]))
    assert results["macro"]["supervised_icl"] == pytest.approx(macro(lambda r: r["supervised_icl"]["test_accuracy"]))
    assert results["micro"]["zero_shot"] == pytest.approx(np.mean([p["zero_shot"] == p["label"] for p in predictions]))
    supervised_correct = sum(r["supervised_icl"]["test_accuracy"] * r["num_test"] for r in per_subject.values())
    assert results["micro"]["supervised_icl"] == pytest.approx(supervised_correct / len(predictions))
    for t in (1, 2):
        assert results["macro"][f"round_{t}"] == pytest.approx(macro(lambda r, t=t: r["rounds"][t - 1]["test_accuracy"]))
        assert results["micro"][f"round_{t}"] == pytest.approx(
            np.mean([p["rounds"][t - 1] == p["label"] for p in predictions]))
        assert [results["subjects"][s][f"round_{t}"] for s in SIZES] == [
            per_subject[s]["rounds"][t - 1]["test_accuracy"] for s in SIZES]
    assert results["micro"] != results["macro"]  # subjects of different sizes weigh differently
    # a validation split smaller than N is drawn from with replacement (the original's draws), others not
    assert [per_subject[s]["supervised_icl"]["protocol"] for s in SIZES] == ["original", "clean", "clean"]
    table = (tmp_path / "run" / "results.md").read_text()
    assert "mean over subjects (macro)" in table and all(f"| {s} | {n} |" in table for s, (n, _) in SIZES.items())
    assert (tmp_path / "run" / "rounds.png").stat().st_size > 0


def test_interrupted_run_resumes_at_the_subject_and_stage_where_it_stopped(tiny_llama_dir, mmlu_root, tmp_path,
                                                                          monkeypatch, scored, model_loads):
    import joint_inference.methods.uicl as uicl
    from joint_inference.runs.root import run_icl as run

    calls, _ = scored
    full = run(mmlu_config(tiny_llama_dir, mmlu_root, tmp_path / "full"))
    original, icl_calls = uicl.icl_predict, []

    def crash_in_second_subject(*args, **kw):
        icl_calls.append(kw["rng_key"])
        if len(icl_calls) == 5:  # 3 per subject (supervised, round 1, round 2): anatomy's round 1
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(uicl, "icl_predict", crash_in_second_subject)
    with pytest.raises(KeyboardInterrupt):
        run(mmlu_config(tiny_llama_dir, mmlu_root, tmp_path / "resumed"))
    monkeypatch.setattr(uicl, "icl_predict", original)
    subjects_dir = tmp_path / "resumed" / "subjects"
    states = {s: json.loads((subjects_dir / s / "state.json").read_text()) for s in ("abstract_algebra", "anatomy")}
    assert list(states["anatomy"]["stages"]) == ["zero_shot/test", "supervised_icl/test"]
    assert not (subjects_dir / "virology").exists() and not (tmp_path / "resumed" / "results.json").exists()
    finished_state = (subjects_dir / "abstract_algebra" / "state.json").stat().st_mtime_ns

    calls.clear()
    model_loads.clear()
    resumed = run(mmlu_config(tiny_llama_dir, mmlu_root, tmp_path / "resumed"))
    assert len(calls) == full["timing"]["prompts_scored"] - sum(s["prompts"] for s in states.values())
    assert (subjects_dir / "abstract_algebra" / "state.json").stat().st_mtime_ns == finished_state
    assert len(model_loads) == 1
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(resumed) == strip(full)
    assert resumed["timing"]["prompts_scored"] == full["timing"]["prompts_scored"]
    with pytest.raises(ConfigError, match="N"):
        run(mmlu_config(tiny_llama_dir, mmlu_root, tmp_path / "resumed", "N=2"))


def test_one_subject_runs_transductively_or_by_the_sampled_protocol(tiny_llama_dir, mmlu_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    one = run(mmlu_config(tiny_llama_dir, mmlu_root, tmp_path / "one", "dataset.subject=anatomy"))
    assert (tmp_path / "one" / "results.json").exists() and not (tmp_path / "one" / "subjects").exists()
    assert one["settings"]["transductive"] and one["num_train"] == one["num_test"] == 9
    assert set(one["zero_shot"]) == {"test_accuracy"} and one["supervised_icl"]["pool_size"] == 4
    sampled = run(mmlu_config(tiny_llama_dir, mmlu_root, tmp_path / "sampled", "dataset.subject=anatomy",
                              "dataset.transductive=false"))
    assert not sampled["settings"]["transductive"]
    assert (sampled["num_train"], sampled["num_test"]) == (4, 4)  # 2 per class, 2/3 : 1/3
    assert sampled["supervised_icl"]["pool_size"] == 4 and "train_accuracy" in sampled["zero_shot"]


def test_num_examples_caps_each_subject_with_a_seeded_subset(tiny_llama_dir, mmlu_root, tmp_path):
    cfg = mmlu_config(tiny_llama_dir, mmlu_root, tmp_path, "dataset.num_examples=4", "dataset.subject=anatomy")
    anatomy = [r for r in read_rows(mmlu_root, "test") if r["subject"] == "anatomy"]
    first, again = task_data(cfg), task_data(cfg)
    assert len(first.test) == 4 and first.test == again.test
    assert first.test == [r for r in anatomy if r in first.test]  # a subset, in the file's order
    cfg.dataset.sample_seed = 7
    assert task_data(cfg).test != first.test
    assert len(first.supervised_pool) == 4  # the validation split is not capped


def test_unknown_subject_names_the_valid_ones(tiny_llama_dir, mmlu_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    cfg = compose("unsupervised_icl_llm", ["dataset=mmlu", f"dataset.data_root={mmlu_root}", "dataset.subject=astrology",
                                           f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown subject 'astrology'.*abstract_algebra, anatomy.*world_religions"):
        run(cfg)
    cfg.dataset.subject = "all"  # only the ICL entry point runs every subject; a plain load names one
    with pytest.raises(ConfigError, match="subject=all .*unsupervised_icl_llm.py"):
        task_data(cfg)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not (SHARED_DATA / "mmlu" / "test.jsonl").exists(), reason="needs ../shared/data/mmlu")
def test_all_57_real_subjects_on_a_tiny_model(tmp_path, model_loads, tokenizer_loads):
    """The whole command on the real files: 57 subjects, 4 questions each, one model load."""
    from joint_inference.runs.root import run_icl as run

    cfg = compose("unsupervised_icl_llm", [
        "dataset=mmlu", "model=tiny_random_llm", "+model.random_init.max_position_embeddings=16384",
        f"dataset.data_root={SHARED_DATA}", "dataset.num_examples=4", "N=1", "T=2", "num_repeats=1",
        "device=cpu", "forward_batch_size=1", "progress=false", f"output_dir={tmp_path}"])  # no padding of long prompts
    start = time.perf_counter()
    results = run(cfg)
    print(f"57 subjects in {time.perf_counter() - start:.1f} s")
    assert len(model_loads) == len(tokenizer_loads) == 1
    assert list(results["subjects"]) == list(cfg.dataset.subjects) and len(results["subjects"]) == 57
    assert all(r["num_test"] == 4 for r in results["subjects"].values()) and results["num_test"] == 57 * 4
    assert results["timing"]["prompts_scored"] == 57 * 4 * (1 + 1 + 2)
    assert set(results["macro"]) == {"zero_shot", "supervised_icl", "round_1", "round_2"}
    assert len(list(tmp_path.glob("subjects/*/results.json"))) == 57
