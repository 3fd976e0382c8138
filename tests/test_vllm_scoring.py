"""The vLLM scorer against the Hugging Face scorer, on CPU, with a stand-in ``vllm`` module.

The stand-in computes the next token's log-probabilities with the real tiny model and returns
them the way vLLM V1 does with ``logprobs_mode="processed_logprobs"``: the logits of tokens
outside ``allowed_token_ids`` are set to -inf before the log-softmax, and the ``logprobs`` most
likely tokens plus the sampled one come back as ``outputs[0].logprobs[0]: {token id: Logprob}``.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from joint_inference.core.errors import ConfigError
from joint_inference.methods.icl import icl_predict, zero_shot_logprobs
from joint_inference.models.tiny import synthetic_sentences
from joint_inference.models.vllm_engine import build_vllm_engine
from joint_inference.prompts.templates import PromptEncoder, Template
from joint_inference.runs.config import config_option
from joint_inference.scoring.scorer import Scorer
from joint_inference.scoring.vllm import VLLMScorer, make_vllm_scorer

TEMPLATE = Template("{sentence}\nThe sentiment of the sentence is {y}.")
SINGLE = ["bad", "good"]  # several tokens each, distinct first tokens; the tiny model predicts both
ONE_TOKEN = ["positive", "sentiment", "the"]  # one token each
MULTI = ["zebra crossing", "zebra stripes", "qux", "zebra"]  # unknown words: several tokens, shared first ones
SENTENCES = synthetic_sentences(12, length=6, seed=3)


# ------------------------------------------------------------------------ the stand-in vllm module
@dataclass
class SamplingParams:  # the fields of vllm.SamplingParams that matter here, same names and defaults
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    seed: int | None = None


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list | None = None


class FakeLLM:
    """``vllm.LLM`` on a saved tiny Hugging Face model, next-token logprobs as vLLM V1 computes them."""

    def __init__(self, model, tokenizer=None, dtype="auto", seed=0, tensor_parallel_size=1,
                 enable_prefix_caching=None, logprobs_mode="raw_logprobs", max_logprobs=20, **engine_args):
        from transformers import AutoModelForCausalLM

        self.model, self.tokenizer, self.dtype, self.seed = model, tokenizer, dtype, seed
        self.tensor_parallel_size, self.enable_prefix_caching = tensor_parallel_size, enable_prefix_caching
        self.logprobs_mode, self.max_logprobs, self.engine_args = logprobs_mode, max_logprobs, engine_args
        self.hf = AutoModelForCausalLM.from_pretrained(model).eval()
        self.calls = []
        FakeLLM.built.append(self)

    @torch.no_grad()
    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(params)
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(f"Requested sample logprobs of {params.logprobs}, which is greater than max allowed: "
                             f"{self.max_logprobs}")
        outputs = []
        for i, prompt in enumerate(prompts):
            ids = prompt["prompt_token_ids"]
            logits = self.hf(torch.tensor([ids])).logits[0, -1].float()
            raw = torch.log_softmax(logits, -1)
            if params.allowed_token_ids:
                allowed = torch.zeros_like(logits, dtype=torch.bool)
                allowed[params.allowed_token_ids] = True
                logits = logits.masked_fill(~allowed, float("-inf"))
            sampled = int(logits.argmax())  # temperature 0: greedy
            lp = torch.log_softmax(logits, -1) if self.logprobs_mode == "processed_logprobs" else raw
            top = torch.topk(lp, params.logprobs or 0).indices.tolist()
            step = {t: Logprob(float(lp[t]), int((lp > lp[t]).sum()) + 1, f"<{t}>") for t in [sampled, *top]}
            outputs.append(RequestOutput(str(i), list(ids), [CompletionOutput(0, f"<{sampled}>", [sampled],
                                                                              float(lp[sampled]), [step])]))
        return outputs


@pytest.fixture()
def fake_vllm(monkeypatch):
    """A ``vllm`` package (LLM, SamplingParams, inputs.TokensPrompt) and a visible 'GPU'."""
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # importlib.util.find_spec reads it
    vllm.__version__ = "0.11.0"
    vllm.LLM, vllm.SamplingParams = FakeLLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}  # a TypedDict in vLLM
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(FakeLLM, "built", [], raising=False)  # engines built in this test
    return vllm


def model_cfg(path, **extra):
    """A causal LM's config (the base every one extends) for the model saved at ``path``."""
    return OmegaConf.merge(config_option("model", "_causal_lm"),
                           {"name": "tiny", "pretrained": str(path), "dtype": "float32", **extra})


def prompts_with_demonstrations(encoder, n_prompts=7):
    """Prompts of 1 to 4 examples (0 to 3 demonstrations), labels cycling over the label set."""
    prompts, labels = [], []
    for i in range(n_prompts):
        m = i % 4 + 1
        prompts.append([encoder.encode({"sentence": SENTENCES[(i + j) % len(SENTENCES)]}) for j in range(m)])
        labels.append([(i * 7 + j) % encoder.num_labels for j in range(m - 1)])
    return prompts, labels


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("mode,names", [("first", SINGLE), ("auto", SINGLE), ("exact", ONE_TOKEN),
                                        ("bot", MULTI), ("bot_minimal", MULTI)])
def test_label_logprobs_equal_the_hf_scorer(request, fake_vllm, model_name, mode, names):
    model, tokenizer = request.getfixturevalue(model_name)
    encoder = PromptEncoder(tokenizer, TEMPLATE, names)
    hf = Scorer(model, encoder, mode, batch_size=3, show_progress=False)
    vl = make_vllm_scorer(model_cfg(request.getfixturevalue(model_name + "_dir")), encoder, mode, show_progress=False)
    assert vl.mode == hf.mode
    prompts, labels = prompts_with_demonstrations(encoder)
    with torch.no_grad():
        want = hf.label_logprobs(prompts, labels)
    got = vl.label_logprobs(prompts, labels, desc="scoring")
    assert got.shape == (len(prompts), len(names)) and got.device.type == "cpu"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    queries = [encoder.encode({"sentence": s}) for s in SENTENCES[:5]]
    demos = [encoder.encode({"sentence": s}) for s in SENTENCES[5:8]]
    with torch.no_grad():
        shared_want = hf.shared_label_logprobs(demos, [0, 1, 1], queries)
    torch.testing.assert_close(vl.shared_label_logprobs(demos, [0, 1, 1], queries), shared_want, atol=1e-4, rtol=1e-4)


def test_engine_and_requests_use_prefix_cache_and_label_tokens_only(tiny_llama, tiny_llama_dir, fake_vllm):
    _, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, MULTI)
    scorer = make_vllm_scorer(model_cfg(tiny_llama_dir, tensor_parallel_size=1), encoder, "bot", seed=5,
                              show_progress=False, gpu_memory_utilization=0.5)
    llm = FakeLLM.built[-1]
    assert (llm.model, llm.tokenizer, llm.dtype, llm.seed, llm.tensor_parallel_size) == (
        str(tiny_llama_dir), str(tiny_llama_dir), "float32", 5, 1)
    assert llm.enable_prefix_caching is True and llm.logprobs_mode == "processed_logprobs"
    assert llm.engine_args == {"gpu_memory_utilization": 0.5}
    scorer.label_logprobs(*prompts_with_demonstrations(encoder, 3))
    params = llm.calls[-1]
    tokens = sorted({t for ids in encoder.label_ids for t in ids})
    assert params.allowed_token_ids == tokens and params.logprobs == len(tokens) <= llm.max_logprobs
    assert params.max_tokens == 1 and params.prompt_logprobs is None and params.temperature == 0


def test_engine_factory_passes_the_model_config_to_vllm(tiny_llama_dir, fake_vllm, monkeypatch):
    """model.tensor_parallel_size, dtype and tokenizer reach vllm.LLM; without a size, every visible GPU is used."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    llm = build_vllm_engine(model_cfg(tiny_llama_dir, tensor_parallel_size=2, dtype="bfloat16", tokenizer="tok"),
                            seed=3, max_logprobs=7)
    assert (llm.model, llm.tokenizer, llm.dtype, llm.seed, llm.tensor_parallel_size, llm.max_logprobs) == (
        str(tiny_llama_dir), "tok", "bfloat16", 3, 2, 7)
    llm = build_vllm_engine(model_cfg(tiny_llama_dir))
    assert (llm.tokenizer, llm.dtype, llm.tensor_parallel_size) == (str(tiny_llama_dir), "float32", 4)
    with pytest.raises(ConfigError, match=r"vLLM >= 0\.12.*0\.11\.0"):
        build_vllm_engine(model_cfg(tiny_llama_dir), min_version="0.12")
    assert "quantization" not in llm.engine_args
    assert build_vllm_engine(model_cfg(tiny_llama_dir, load_in_4bit=True)).engine_args == {
        "quantization": "bitsandbytes"}  # vLLM's in-flight 4-bit


@pytest.mark.parametrize("support_sampling", ["per_query", "shared"])
def test_icl_predictions_equal_the_hf_scorer(tiny_llama, tiny_llama_dir, fake_vllm, support_sampling):
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    hf = Scorer(model, encoder, "first", batch_size=4, show_progress=False)
    vl = make_vllm_scorer(model_cfg(tiny_llama_dir), encoder, "first", show_progress=False)
    pool = encoder.encode_all([{"sentence": s} for s in synthetic_sentences(16, length=5, seed=7)])
    pool_labels = np.arange(16) % 2
    queries = encoder.encode_all([{"sentence": s} for s in SENTENCES])
    kwargs = {"n": 3, "num_repeats": 3, "rng_key": (0, 1, 0), "support_sampling": support_sampling, "block_size": 4}
    want, got = (icl_predict(s, pool, pool_labels, queries, **kwargs) for s in (hf, vl))
    np.testing.assert_array_equal(got.majority, want.majority)
    np.testing.assert_array_equal(got.votes, want.votes)
    np.testing.assert_allclose(got.label_logprob, want.label_logprob, atol=1e-4)
    assert 0 < want.votes.mean() < 1  # both labels are predicted: the comparison can fail
    torch.testing.assert_close(zero_shot_logprobs(vl, queries), zero_shot_logprobs(hf, queries), atol=1e-4, rtol=1e-4)


def test_missing_vllm_is_a_config_error(tiny_llama, tiny_llama_dir, monkeypatch):
    encoder = PromptEncoder(tiny_llama[1], TEMPLATE, SINGLE)
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed: find_spec gives None, import fails
    with pytest.raises(ConfigError, match="pip install vllm"):
        make_vllm_scorer(model_cfg(tiny_llama_dir), encoder, "first")


def test_no_gpu_old_vllm_and_unloadable_models_are_config_errors(tiny_llama, tiny_llama_dir, fake_vllm, monkeypatch):
    encoder = PromptEncoder(tiny_llama[1], TEMPLATE, SINGLE)
    with pytest.raises(ConfigError, match="random_init"):
        make_vllm_scorer(model_cfg(tiny_llama_dir, random_init={"arch": "llama"}), encoder)
    with pytest.raises(ConfigError, match="gguf_file"):
        make_vllm_scorer(model_cfg(tiny_llama_dir, gguf_file="m.gguf"), encoder)
    monkeypatch.setattr(fake_vllm, "__version__", "0.9.2")
    with pytest.raises(ConfigError, match=r"vLLM >= 0\.10\.2.*0\.9\.2"):
        make_vllm_scorer(model_cfg(tiny_llama_dir), encoder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*backend=hf"):
        make_vllm_scorer(model_cfg(tiny_llama_dir), encoder)


def test_exact_multi_token_labels_and_read_all_are_refused(tiny_llama, tiny_llama_dir, fake_vllm):
    _, tokenizer = tiny_llama
    multi = PromptEncoder(tokenizer, TEMPLATE, MULTI)
    for mode in ("exact", "auto"):  # auto resolves to exact: the labels share first tokens
        with pytest.raises(ConfigError, match=r"label_mode=exact with multi-token.*label_mode=first.*backend=hf"):
            make_vllm_scorer(model_cfg(tiny_llama_dir), multi, mode)
    assert FakeLLM.built == []  # refused before any weights were loaded
    encoder = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    scorer = make_vllm_scorer(model_cfg(tiny_llama_dir), encoder, "first", show_progress=False)
    example = encoder.encode({"sentence": SENTENCES[0]})
    with pytest.raises(ConfigError, match="read='query'.*fine-tuning.*backend=hf"):
        scorer.label_logprobs([[example, example]], [[0, 1]], read="all")


def test_label_tokens_missing_from_the_response_are_an_error(tiny_llama, fake_vllm, tiny_llama_dir):
    """An engine returning raw (unmasked) top-k log-probs may leave label tokens out: caught, not guessed."""
    _, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    llm = FakeLLM(str(tiny_llama_dir), logprobs_mode="processed_logprobs")
    llm.generate = lambda prompts, params, use_tqdm: [
        RequestOutput("0", [], [CompletionOutput(0, "", [1], 0.0, [{1: Logprob(0.0, 1)}])]) for _ in prompts]
    scorer = VLLMScorer(llm, encoder, "first", show_progress=False)
    with pytest.raises(RuntimeError, match="processed_logprobs"):
        scorer.label_logprobs([[encoder.encode({"sentence": SENTENCES[0]})]], [[]])


def test_a_whole_uicl_run_on_vllm_equals_the_hf_run(tiny_llama_dir, tiny_sst2_root, tmp_path, fake_vllm):
    """backend=vllm from the entry point: the same zero-shot, baseline and round predictions as backend=hf."""
    from joint_inference.runs.root import run_icl as run
    from tests.test_icl import icl_config

    hf = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "hf", "label_mode=first", "save_predictions=true"))
    vl = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "vllm", "label_mode=first", "save_predictions=true",
                        "backend=vllm"))
    assert FakeLLM.built and vl["settings"]["device"] == "vllm"
    logprobs = {name: [r["diagnostics"].pop("mean_label_logprob") for r in run_["rounds"]]
                for name, run_ in (("hf", hf), ("vllm", vl))}
    assert logprobs["vllm"] == pytest.approx(logprobs["hf"], abs=1e-4)  # the two backends' float error
    strip = lambda r: {k: v for k, v in r.items() if k not in ("timing", "settings")}  # noqa: E731
    assert strip(vl) == strip(hf)
    assert (tmp_path / "vllm" / "predictions.jsonl").read_text() == (tmp_path / "hf" / "predictions.jsonl").read_text()
