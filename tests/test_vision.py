"""Image tasks: a tiny random LLaVA-style VLM read through cached image embeddings must score exactly
as the model reading pixels; the feature cache, image loading, configs and both entry scripts."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from joint_inference.core.errors import ConfigError
from joint_inference.data.images import load_image_task
from joint_inference.models.vision import image_fragments, tiny_vlm
from joint_inference.prompts.images import ImagePromptEncoder
from joint_inference.prompts.templates import Template
from joint_inference.scoring.scorer import Scorer, minimal_prefix_lengths
from tests.conftest import CONFIG_DIR, REPO, SHARED_DATA, compose, settings_of

TEMPLATE = Template("<image>An image of {y}.<|endofchunk|>")
LABELS = ["cat", "dog", "ship"]
IMAGE_DATASETS = ["cifar10", "cifar100", "food101", "cocoqa_color", "cocoqa_number"]


def synthetic_images(n: int, seed: int = 0):
    """Random RGB images of varied sizes (the processor resizes them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (int(rng.integers(24, 48)), 40, 3), dtype=np.uint8)) for _ in range(n)]


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_parquet(path, images, labels, extra=None):
    """A parquet file in the hub's CIFAR schema: ``img`` = {bytes, path}, ``label``."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    rows = {"img": [{"bytes": b if isinstance(b, bytes) else png(b), "path": None} for b in images], "label": labels}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def vlm():
    return tiny_vlm(seed=3)


@pytest.fixture()
def image_root(tmp_path, monkeypatch):
    """A DATA_ROOT with cifar10/test.parquet: 60 random images, 10 classes; the feature cache in tmp."""
    monkeypatch.setenv("JOINT_INFERENCE_CACHE", str(tmp_path / "cache"))
    write_image_parquet(tmp_path / "data" / "cifar10" / "test.parquet", synthetic_images(60), [i % 10 for i in range(60)])
    return tmp_path / "data"


def encoder_for(vlm, images, mode):
    model, processor = vlm
    fragments, features = image_fragments(model, processor, images, batch_size=4, progress=False)
    encoder = ImagePromptEncoder(processor.tokenizer, TEMPLATE, LABELS, fragments, features)
    return Scorer(model, encoder, mode, batch_size=3, show_progress=False), encoder


def reference_scores(vlm, encoder, images, chosen, labels, mode):
    """Slow reference for one prompt of images ``chosen``: the VLM merges its own image features from
    pixels, full-vocabulary logits, label scores computed from their definitions (docs/protocol.md §2).
    Returns (reads, K): every example's label when all are labelled, else the query's."""
    model, processor = vlm
    ids, positions = encoder.assemble([encoder.encode({"image": i}) for i in chosen], labels)
    ids = [model.config.image_token_index if t < 0 else t for t in ids]
    pixels = processor.image_processor(images=[images[i] for i in chosen], return_tensors="pt").pixel_values

    per_image = sum(t < 0 for t in encoder.fragments[chosen[0]])

    def logits_of(seq):  # a branch may stop before the later images
        shown = seq.count(model.config.image_token_index) // per_image
        return model(input_ids=torch.tensor([seq]), pixel_values=pixels[:shown]).logits[0].float()

    logits = logits_of(ids)
    rows = []
    for p in positions if len(labels) == len(chosen) else positions[-1:]:
        if mode == "bot_minimal":
            lengths = minimal_prefix_lengths(encoder.label_ids)
            rows.append(torch.stack([logits[p, list(l_ids[:m])].mean() for l_ids, m in zip(encoder.label_ids, lengths)]))
        else:  # exact: sum of the label tokens' log-probs, on a branch of the prompt
            scores = []
            for l_ids in encoder.label_ids:
                branch = logits_of(ids[: p + 1] + list(l_ids[:-1])).log_softmax(-1)
                scores.append(sum(branch[p + j, t] for j, t in enumerate(l_ids)))
            rows.append(torch.stack(scores))
    return torch.stack(rows).log_softmax(-1)


@pytest.mark.parametrize("mode", ["bot_minimal", "exact"])
@torch.no_grad()
def test_scores_from_cached_image_embeddings_equal_the_vlm_reading_pixels(vlm, mode):
    images = synthetic_images(9, seed=1)
    scorer, encoder = encoder_for(vlm, images, mode)
    assert max(map(len, encoder.label_ids)) > 1  # multi-token labels: the modes differ
    rng = np.random.default_rng(0)
    chosen = [rng.choice(len(images), size, replace=False).tolist() for size in (1, 2, 3, 4)]  # varied lengths
    labels = [rng.integers(0, len(LABELS), len(c) - 1).tolist() for c in chosen]
    prompts = [[encoder.encode({"image": i}) for i in c] for c in chosen]
    got = scorer.label_logprobs(prompts, labels)
    want = torch.cat([reference_scores(vlm, encoder, images, c, lab, mode) for c, lab in zip(chosen, labels)])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the images matter
    # read="all" (the fine-tuning reward): every example's label is read after the pairs before it
    chosen = [rng.choice(len(images), 3, replace=False).tolist() for _ in range(3)]
    labels = [rng.integers(0, len(LABELS), 3).tolist() for _ in chosen]
    got_all = scorer.label_logprobs([[encoder.encode({"image": i}) for i in c] for c in chosen], labels, read="all")
    want_all = torch.stack([reference_scores(vlm, encoder, images, c, lab, mode) for c, lab in zip(chosen, labels)])
    torch.testing.assert_close(got_all, want_all, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_tokens", [None, 4096])
@torch.no_grad()
def test_shared_demonstrations_with_images_equal_separate_prompts(vlm, monkeypatch, batch_tokens):
    """Also with the CPU's token budget, where the queries (image placeholders and all) are packed to a row."""
    images = synthetic_images(8, seed=2)
    scorer, encoder = encoder_for(vlm, images, "bot_minimal")
    scorer.batch_tokens = batch_tokens
    packed = []  # the queries of each packed pass

    def packed_hidden(seqs, prefix):
        packed.append(len(seqs))
        return Scorer._packed_hidden(scorer, seqs, prefix)

    monkeypatch.setattr(scorer, "_packed_hidden", packed_hidden)
    examples = [encoder.encode({"image": i}) for i in range(len(images))]
    demos, demo_labels, queries = examples[:3], [2, 0, 1], examples[3:]
    shared = scorer.shared_label_logprobs(demos, demo_labels, queries)
    separate = scorer.label_logprobs([[*demos, q] for q in queries], [demo_labels] * len(queries))
    torch.testing.assert_close(shared, separate, atol=2e-5, rtol=1e-4)
    assert sum(packed) == (len(queries) if batch_tokens else 0)


def test_image_template_needs_its_image_before_the_label(vlm):
    model, processor = vlm
    with pytest.raises(ConfigError, match="<image> before"):
        ImagePromptEncoder(processor.tokenizer, Template("An image of {y}. <image>"), LABELS, [[-1]], torch.zeros(1, 32))


# ------------------------------------------------------------------------------- data loading
def image_cfg(root, *overrides):
    return compose("unsupervised_icl_vlm", ["model=tiny_random_vlm", "dataset=cifar10", f"dataset.data_root={root}",
                                            "dataset.num_examples=60", *overrides])


def test_image_task_sample_follows_the_protocol(image_root):
    cfg = image_cfg(image_root)
    data = load_image_task(cfg.dataset, list(cfg.labelset.names))
    assert len(data.train) == 40 and len(data.test) == 20  # 6 per class: 4 pool, 2 test
    assert np.bincount(data.train_labels, minlength=10).tolist() == [4] * 10
    assert len(data.images) == 60 and sorted(r["image"] for r in data.train + data.test) == list(range(60))
    rows = {r["row"] for r in data.train} | {r["row"] for r in data.test}
    assert len(rows) == 60
    assert data.train_labels.tolist() == [r["row"] % 10 for r in data.train]  # label i % 10 was written at row i


def test_the_originals_splits_take_every_row_of_the_pool_and_test_splits(image_root):
    """dataset.test_split: every row of source_splits is the pool and every row of test_split the test set
    (the original's vision protocol, +experiment=table3_*); the same split for both (its COCO-QA runs) gives the
    same rows twice, labelled separately; num_examples caps each at a seeded subset."""
    pixels = synthetic_images(25, seed=1)
    write_image_parquet(image_root / "cifar10" / "train.parquet", pixels, [(i * 3) % 10 for i in range(25)])
    cfg = compose("unsupervised_icl_vlm", ["+experiment=table3_openflamingo", "model=tiny_random_vlm",
                                           f"dataset.data_root={image_root}"])
    assert (list(cfg.dataset.source_splits), cfg.dataset.test_split, cfg.dataset.num_examples) == (["train"], "test",
                                                                                                    None)
    data = load_image_task(cfg.dataset, list(cfg.labelset.names))
    assert [r["row"] for r in data.train] == list(range(25)) and [r["row"] for r in data.test] == list(range(60))
    assert data.train_labels.tolist() == [(i * 3) % 10 for i in range(25)]
    assert data.test_labels.tolist() == [i % 10 for i in range(60)]
    assert np.array_equal(np.asarray(data.images[data.train[7]["image"]]), np.asarray(pixels[7]))
    same = load_image_task(image_cfg(image_root, "dataset.source_splits=[test]", "dataset.test_split=test",
                                     "dataset.num_examples=null").dataset, list(cfg.labelset.names))
    assert [r["row"] for r in same.train] == [r["row"] for r in same.test] == list(range(60))
    assert same.train is not same.test  # two splits of the run, each labelled on its own
    assert [r["image"] for r in same.train] == [r["image"] for r in same.test]  # each image decoded once
    assert len(same.images) == 60
    capped = load_image_task(image_cfg(image_root, "dataset.source_splits=[train]", "dataset.test_split=test",
                                       "dataset.num_examples=10").dataset, list(cfg.labelset.names))
    assert (len(capped.train), len(capped.test)) == (10, 10)
    assert {r["row"] for r in capped.test} <= set(range(60)) and len({r["row"] for r in capped.test}) == 10


def test_an_undecodable_image_stops_or_is_skipped(tmp_path):
    images = synthetic_images(30)
    blobs = [png(im) for im in images]
    blobs[7] = b"not an image"
    write_image_parquet(tmp_path / "cifar10" / "test.parquet", blobs, [i % 10 for i in range(30)])
    cfg = image_cfg(tmp_path, "dataset.num_examples=30")
    with pytest.raises(ConfigError, match=r"row 7 .*on_bad_image=skip"):
        load_image_task(cfg.dataset, list(cfg.labelset.names))
    cfg = image_cfg(tmp_path, "dataset.num_examples=30", "dataset.on_bad_image=skip")
    data = load_image_task(cfg.dataset, list(cfg.labelset.names))
    assert len(data.train) + len(data.test) == 29 and 7 not in {r["row"] for r in data.train + data.test}


def test_cocoqa_local_layout_labels_by_answer(tmp_path):
    folder = tmp_path / "cocoqa_color"
    (folder / "images").mkdir(parents=True)
    answers = ["red", "blue", "turquoise"] * 6
    rows = []
    for i, (image, answer) in enumerate(zip(synthetic_images(len(answers)), answers)):
        image.save(folder / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "question": f"what is the color of thing {i}", "answer": answer})
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose("unsupervised_icl_vlm", ["dataset=cocoqa_color", f"dataset.data_root={tmp_path}",
                                           "labelset.names=[red,blue]", "dataset.num_classes=2"])
    data = load_image_task(cfg.dataset, list(cfg.labelset.names))
    kept = data.train + data.test
    assert len(kept) == 12  # "turquoise" is not in the label set
    assert all(answers[r["row"]] != "turquoise" for r in kept)  # rows index the kept answers
    by_question = {r["question"]: lab for r, lab in zip(data.train + data.test, np.r_[data.train_labels, data.test_labels])}
    assert all(["red", "blue"][lab] == answers[int(q.split()[-1])] for q, lab in by_question.items())
    prefix, _ = Template(cfg.template.text).render_parts(kept[0])
    assert prefix.startswith("<image>Question: what is the color of thing") and prefix.endswith("? Short answer:")


def test_cocoqa_is_not_on_the_hub(monkeypatch):
    monkeypatch.delenv("DATA_ROOT", raising=False)
    cfg = compose("unsupervised_icl_vlm", ["dataset=cocoqa_number", "dataset.data_root=null"])
    with pytest.raises(ConfigError, match="not on the hub"):
        load_image_task(cfg.dataset, list(cfg.labelset.names))


# ------------------------------------------------------------------------------ feature cache
def test_feature_cache_round_trip_and_stale_settings(image_root, monkeypatch):
    import joint_inference.models.vision as vision

    cfg = settings_of(image_cfg(image_root))
    data = load_image_task(cfg.dataset, list(cfg.labelset.names))
    model, processor = vision.load_vlm(cfg.model, torch.device("cpu"))
    fragments, features = vision.vlm_image_features(cfg.model, cfg.dataset, model, processor, data)
    assert len(fragments) == len(data.images) and features.shape[0] == sum(f.count(-1) for f in fragments)

    def must_not_run(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(vision, "image_fragments", must_not_run)
    again = vision.vlm_image_features(cfg.model, cfg.dataset, model, processor, data)
    assert again[0] == fragments and torch.equal(again[1], features)
    processor.image_processor.image_mean = [0.0, 0.0, 0.0]  # other preprocessing: the cache is stale
    with pytest.raises(ConfigError, match=r"different settings \(preprocessing.image_mean"):
        vision.vlm_image_features(cfg.model, cfg.dataset, model, processor, data)

    from transformers import CLIPVisionModelWithProjection

    projected, forward = [], CLIPVisionModelWithProjection.forward

    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        projected.append(out.image_embeds.detach().float())
        return out

    monkeypatch.setattr(CLIPVisionModelWithProjection, "forward", recording)
    clip = vision.clip_features(cfg.model, cfg.dataset, data, torch.device("cpu"))
    monkeypatch.setattr(CLIPVisionModelWithProjection, "forward", forward)
    assert clip["train"].shape[0] == len(data.train) and clip["test"].shape[0] == len(data.test)
    raw = torch.cat(projected)  # the original's head reads the projection's output as it is, not L2-normalised
    torch.testing.assert_close(clip["train"], raw[[row["image"] for row in data.train]])
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(raw)))
    monkeypatch.setattr(vision, "clip_embeddings", must_not_run)
    torch.testing.assert_close(vision.clip_features(cfg.model, cfg.dataset, data, torch.device("cpu"))["test"], clip["test"])


def test_precompute_features_script_fills_the_cache(image_root, tmp_path):
    env = {"JOINT_INFERENCE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "precompute_features.py"), "model=tiny_random_vlm",
                           "dataset=cifar10", f"dataset.data_root={image_root}", "dataset.num_examples=60",
                           "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    cached = sorted(p.relative_to(tmp_path / "cache" / "features").parts[:2]
                    for p in (tmp_path / "cache" / "features").rglob("*.pt"))
    assert cached == [("clip", "tiny_random_clip"), ("vlm", "tiny_random_vlm")]


# ---------------------------------------------------------------------------------- end to end
def test_unsupervised_icl_with_images_end_to_end(image_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    results = run(image_cfg(image_root, "N=2", "T=2", "num_repeats=3", "device=cpu", "progress=false",
                            f"output_dir={tmp_path / 'run'}"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(saved["zero_shot"]) == {"train_accuracy", "test_accuracy"}
    assert [r["round"] for r in saved["rounds"]] == [1, 2]
    for r in saved["rounds"]:
        assert 0 <= r["test_accuracy_std"] <= 0.5 and 0 <= r["test_accuracy_mean"] <= 1
    stage = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]["round_1/test"]
    votes = np.array(stage["test_votes"])
    assert votes.shape == (20, 3)
    # the reported mean over repeats is the mean accuracy of each repeat's predictions
    data = load_image_task(image_cfg(image_root).dataset, list(image_cfg(image_root).labelset.names))
    assert saved["rounds"][0]["test_accuracy_mean"] == pytest.approx((votes == data.test_labels[:, None]).mean())
    assert saved["settings"]["label_mode"] == "bot_minimal"


def test_vision_protocol_original_draws_by_class_weight_and_relabels_the_pool_with_one_prompt(
        image_root, tmp_path, monkeypatch):
    """The original's vision script, run by its preset (+experiment=table3_openflamingo, here on a tiny random
    VLM): every train image the pool, every test image a query; each demonstration a class-weighted draw (no
    quotas), the pool relabelled by one prompt per image, the test set by num_repeats prompts and their vote;
    after the last round the pool is not relabelled."""
    import joint_inference.methods.icl as icl
    from joint_inference.runs.root import run_icl as run

    write_image_parquet(image_root / "cifar10" / "train.parquet", synthetic_images(30, seed=2),
                        [i % 10 for i in range(30)])
    weighted, quotas = [], []
    for name, calls in (("class_weighted_support", weighted), ("balanced_support", quotas)):
        monkeypatch.setattr(icl, name, lambda *a, _f=getattr(icl, name), _c=calls, **k: _c.append(1) or _f(*a, **k))
    results = run(compose("unsupervised_icl_vlm", [
        "+experiment=table3_openflamingo", "model=tiny_random_vlm", f"dataset.data_root={image_root}", "N=2", "T=2",
        "num_repeats=3", "device=cpu", "progress=false", "supervised_icl=false", "save_predictions=true",
        f"output_dir={tmp_path / 'run'}"]))
    assert (results["num_train"], results["num_test"]) == (30, 60)
    assert (results["settings"]["protocol"], results["settings"]["seed"]) == ("original", 42)
    stages = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]
    assert sorted(stages) == ["round_1/test", "round_1/train", "round_2/test", "zero_shot/test", "zero_shot/train"]
    assert np.array(stages["round_1/test"]["test_votes"]).shape == (60, 3)
    assert np.array(stages["round_1/train"]["train_votes"]).shape == (30, 1)
    assert (len(weighted), len(quotas)) == (2 * 60 * 3 + 30, 0)
    first, last = results["rounds"]
    assert "train_accuracy" in first and first["diagnostics"]["flip_fraction"] is not None
    assert "train_accuracy" not in last and last["diagnostics"] is None and "test_accuracy" in last
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert {p["split"]: p["rounds"][1] is None for p in predictions} == {"train": True, "test": False}
    assert "## Label-free diagnostics" in (tmp_path / "run" / "results.md").read_text()
    assert results["timing"]["prompts_scored"] == 90 + 2 * 60 * 3 + 30  # zero-shot, the rounds' votes, one relabel


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar10" / "test.parquet").exists(), reason="needs ../shared/data")
def test_the_documented_smoke_command_runs_on_real_cifar10(tmp_path):
    env = {"DATA_ROOT": str(SHARED_DATA), "JOINT_INFERENCE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "unsupervised_icl_vlm.py"), "model=tiny_random_vlm",
                           "dataset=cifar10", "dataset.num_examples=60", "N=2", "T=1", "num_repeats=1", "device=cpu",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["num_train"] == 40 and results["num_test"] == 20 and len(results["rounds"]) == 1


@pytest.mark.parametrize("task_encoder", ["lora", "linear"])
def test_unsupervised_fine_tuning_with_images_end_to_end(image_root, tmp_path, task_encoder):
    from joint_inference.runs.root import run_finetuning as run

    out = tmp_path / task_encoder
    cfg = compose("unsupervised_ft_vlm", [
        "model=tiny_random_vlm", "dataset=cifar10", f"dataset.data_root={image_root}", "dataset.num_examples=60",
        f"task_encoder={task_encoder}", "batch_size=2", "N=4", "num_iterations=3", "eval_freq=3", "device=cpu",
        "progress=false", "optimizers.lora.warmup_steps=1", f"output_dir={out}"])
    results = run(cfg)
    assert results["timing"]["steps"] == 3 and [h["step"] for h in results["history"]] == [0, 3]
    assert json.loads((out / "results.json").read_text())["task_encoder"] == task_encoder
    if task_encoder == "lora":
        from safetensors.torch import load_file

        weights = load_file(out / "adapter" / "adapter_model.safetensors")
        assert weights and all("language_model" in k for k in weights)  # the vision tower has no adapters
        assert {k.split(".")[-3] for k in weights} == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert results["settings"]["lr"] == 1e-4
    else:
        assert (out / "linear_head" / "linear_head.pt").exists() and results["settings"]["lr"] == 1e-3


def test_linear_head_starts_at_pytorchs_default_init(image_root, tmp_path):
    """As the original's vision head: nn.Linear's own initialisation drawn after seeding, not zeros; the run's seed."""
    from joint_inference.methods.finetune import LinearTaskEncoder
    from joint_inference.runs.root import run_finetuning as run

    features = {"train": torch.randn(5, 16)}
    rng_before = torch.get_rng_state()
    head = LinearTaskEncoder(features, 10, seed=7).head
    assert torch.equal(torch.get_rng_state(), rng_before)  # drawn from a forked generator
    torch.manual_seed(7)
    expected = torch.nn.Linear(16, 10)
    assert head.weight.abs().sum() > 0 and torch.equal(head.weight, expected.weight)
    assert torch.equal(head.bias, expected.bias)

    out = tmp_path / "run"
    run(compose("unsupervised_ft_vlm", [
        "model=tiny_random_vlm", "dataset=cifar10", f"dataset.data_root={image_root}", "dataset.num_examples=60",
        "task_encoder=linear", "batch_size=2", "N=4", "num_iterations=0", "seed=5", "device=cpu", "progress=false",
        f"output_dir={out}"]))
    saved = torch.load(out / "linear_head" / "linear_head.pt", weights_only=True)
    torch.manual_seed(5)
    expected = torch.nn.Linear(saved["weight"].shape[1], 10)
    assert torch.equal(saved["weight"], expected.weight) and torch.equal(saved["bias"], expected.bias)


def test_linear_task_encoder_learns_from_the_reward():
    """A linear head on fixed features, trained by train_step on a reward that prefers the true class,
    separates two feature clusters (steps are the UFT loop's own)."""
    from joint_inference.methods.finetune import LinearTaskEncoder, make_optimizer, train_step

    g = torch.Generator().manual_seed(0)
    gold = torch.arange(64) % 2
    features = torch.randn(64, 8, generator=g) + 3 * torch.nn.functional.one_hot(gold, 8).float()
    encoder = LinearTaskEncoder({"train": features, "test": features}, 2)
    optimizer, scheduler = make_optimizer(encoder.parameters(), 0.1)

    def reward(idx, labels):
        return torch.where(torch.nn.functional.one_hot(gold[idx], 2).bool(), 0.0, -1.0) / idx.shape[1]

    for _ in range(30):
        idx = torch.randperm(64, generator=g)[:32].view(4, 8)
        train_step(encoder, reward, idx, optimizer, scheduler, estimator="rao_marginalized", baseline=True, gamma=1.0,
                   max_norm=10.0, generator=g)
    accuracy = (encoder.logits("test", range(64)).argmax(-1) == gold).float().mean()
    assert accuracy > 0.95


# ------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", IMAGE_DATASETS)
def test_image_dataset_configs_compose(name):
    cfg = compose("unsupervised_icl_vlm", [f"dataset={name}"])
    assert cfg.dataset.modality == "image" and len(cfg.labelset.names) == cfg.dataset.num_classes
    assert len(set(cfg.labelset.names)) == len(cfg.labelset.names)
    assert cfg.template.text.startswith("<image>") and cfg.template.text.endswith("<|endofchunk|>")
    assert cfg.N == 16 and cfg.num_repeats == 3 and cfg.T == 10 and cfg.label_mode == "bot_minimal"


def test_label_sets_match_the_hub_class_counts():
    sizes = {name: len(OmegaConf.load(f"{CONFIG_DIR}/labelset/{name}.yaml").names) for name in IMAGE_DATASETS[:3]}
    assert sizes == {"cifar10": 10, "cifar100": 100, "food101": 101}


def test_label_sets_are_the_originals_where_it_renamed_or_chose_classes():
    """The prompts name the classes as the original release's label sets do: COCO-QA's ten colours and ten
    numbers in its order (its misc/vqa_datasets.py), CIFAR-100's class 76 "high-rise" instead of "skyscraper"."""
    names = {name: list(OmegaConf.load(f"{CONFIG_DIR}/labelset/{name}.yaml").names) for name in IMAGE_DATASETS}
    assert names["cocoqa_color"] == ["brown", "purple", "black", "red", "orange", "yellow", "white", "gray", "blue",
                                     "green"]
    assert names["cocoqa_number"] == ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    assert names["cifar100"][75:78] == ["skunk", "high-rise", "snail"]


def test_vision_fine_tuning_defaults_follow_the_task_encoder():
    lora = compose("unsupervised_ft_vlm", ["dataset=cifar100"])
    assert (lora.batch_size, lora.N, lora.num_iterations, lora.max_norm) == (32, 16, 3000, 10.0)
    assert dict(lora.optimization) == {"lr": 1e-4, "schedule": "cosine", "warmup_steps": 500, "min_lr": 1e-6}
    assert lora.lora.r == 2 and lora.model.name == "openflamingo_4b"
    linear = compose("unsupervised_ft_vlm", ["task_encoder=linear"])
    assert dict(linear.optimization) == {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0, "min_lr": 0.0}


# ------------------------------------------------------------------------------- OpenFlamingo
def test_openflamingo_missing_package_names_the_install_steps(image_root, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_open_clip(name, *args, **kwargs):
        if name.split(".")[0] in ("open_clip", "open_flamingo"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_open_clip)
    from joint_inference.runs.root import run_icl as run

    with pytest.raises(ConfigError, match=r"pip install open_clip_torch==3.3.0 .*open_flamingo==2.0.1"):
        run(image_cfg(image_root, "model=openflamingo_4b", "device=cpu", f"output_dir={tmp_path}"))
    assert not (tmp_path / "results.json").exists()


class _Recorder(torch.nn.Module):
    """Stands in for OpenFlamingo's parts: records what the body hands them."""

    def __init__(self):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x=None, **kwargs):
        self.calls.append(x if x is not None else kwargs)
        return x


def test_openflamingo_body_conditions_each_row_on_its_own_images():
    from types import SimpleNamespace

    from joint_inference.models.openflamingo import FlamingoBody

    media_token = 5
    layers = [SimpleNamespace(vis=None, media=None, cached=None) for _ in range(2)]
    for layer in layers:
        layer.condition_vis_x = lambda v, layer=layer: setattr(layer, "vis", v)
        layer.condition_media_locations = lambda m, layer=layer: setattr(layer, "media", m)
        layer.condition_use_cached_media = lambda c, layer=layer: setattr(layer, "cached", c)
    transformer, perceiver = _Recorder(), _Recorder()
    transformer.get_input_embeddings = lambda: None
    lang = SimpleNamespace(base_model_prefix="model", model=transformer, _get_decoder_layers=lambda: layers,
                           clear_conditioned_layers=lambda: None)
    flamingo = SimpleNamespace(perceiver=perceiver, lang_encoder=lang, media_token_id=media_token)
    tokens = torch.arange(4 * 3 * 2, dtype=torch.float).view(4, 3, 2)  # 4 images, 3 patches, dim 2
    body = FlamingoBody(flamingo, tokens)
    ids = torch.tensor([[7, -3, 8, -1, 9], [-2, 8, 9, 0, 0]])  # row 0: images 2 then 0; row 1: image 1
    body(input_ids=ids, attention_mask=torch.ones_like(ids))
    vision = perceiver.calls[0]
    assert vision.shape == (2, 2, 1, 3, 2)
    torch.testing.assert_close(vision[0, :, 0], tokens[[2, 0]])
    torch.testing.assert_close(vision[1, 0, 0], tokens[1])
    assert not vision[1, 1].any()  # padding: row 1 has one image
    sent = transformer.calls[0]["input_ids"]
    assert sent.tolist() == [[7, 5, 8, 5, 9], [5, 8, 9, 0, 0]]
    assert all(layer.media.tolist() == (sent == media_token).tolist() and layer.cached is False for layer in layers)
    with pytest.raises(ConfigError, match="per_query"):
        body(input_ids=ids, cache=object())


def test_a_label_set_of_the_wrong_size_is_refused(image_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    with pytest.raises(ConfigError, match="label set has 100 names but dataset 'cifar10' has 10 classes"):
        run(image_cfg(image_root, "labelset=cifar100", "device=cpu", f"output_dir={tmp_path}"))
