"""GPU checks (marker ``gpu``, run by scripts/gpu_kit.sh): what only a CUDA device can show.

fp32 scores on the GPU equal the CPU's; bf16 stays within a stated tolerance and predicts the same;
shared demonstrations equal whole prompts; a real out-of-memory halves the batch without changing a
prediction; UICL and fine-tuning runs resume; OpenFlamingo, built by its own package, runs a UICL round
and a UFT step, and its cached CLIP tokens score as its pixels do. Models are random, of real shapes
where the shape matters (joint_inference/models/shapes.py). Skipped without CUDA; ``GPU_TESTS_DEVICE=cpu``
runs them on the CPU on fewer prompts (all but the out-of-memory check), to check the checks.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os

import numpy as np
import pytest
import torch

from joint_inference.models.shapes import random_lm
from joint_inference.models.tiny import synthetic_sentences, train_tokenizer
from joint_inference.prompts.templates import PromptEncoder
from joint_inference.scoring.scorer import Scorer
from tests.conftest import compose, settings_of, task_data
from tests.test_scoring import MULTI, SINGLE, TEMPLATE, make_prompts

DEVICE = torch.device(os.environ.get("GPU_TESTS_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="CUDA itself: a real out-of-memory error")
PROMPTS = 48 if ON_CUDA else 4
# The largest |log-prob| difference bf16 may make on 16-shot prompts of a random Gemma-3-270M-shaped model
BF16_TOLERANCE = 0.08  # 0.017 on a CPU (6 prompts)
FP32 = {"atol": 1e-4, "rtol": 1e-4}  # as the CPU scorer against its slow reference (test_scoring.py)


def on_device(model, dtype=torch.float32):
    """A copy of ``model`` on the device in ``dtype``."""
    return copy.deepcopy(model).to(device=DEVICE, dtype=dtype)


def sst2_length_prompts(encoder, num_prompts: int, n: int = 16, seed: int = 0):
    """``num_prompts`` prompts of ``n`` demonstrations (random labels) and a query, sentences of SST-2's
    mean length (~23 tokens): 16-shot prompts of ~570 tokens, longer than Gemma's 512-token window."""
    sentences = synthetic_sentences(num_prompts * (n + 1), length=6, seed=seed)
    examples = encoder.encode_all([{"sentence": s} for s in sentences])
    rng = np.random.default_rng(seed)
    prompts = [examples[i * (n + 1):(i + 1) * (n + 1)] for i in range(num_prompts)]
    return prompts, [rng.integers(0, encoder.num_labels, n).tolist() for _ in prompts]


def assert_bf16_close(bf16: torch.Tensor, fp32: torch.Tensor) -> None:
    """Within BF16_TOLERANCE, and the same label wherever fp32's two best labels are further apart than
    twice that (a closer call may flip in any precision); most predictions must be such clear calls."""
    assert float((bf16.float() - fp32).abs().max()) <= BF16_TOLERANCE
    top2 = fp32.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * BF16_TOLERANCE
    assert clear.float().mean() >= 0.5, "too many near-ties for the check to mean anything"
    assert torch.equal(bf16.argmax(-1)[clear], fp32.argmax(-1)[clear])


@pytest.fixture(scope="module")
def gemma_shaped():
    """A random Gemma-3-270M-shaped model (sliding-window layers, 262k vocabulary) in fp32 on the device."""
    return random_lm("gemma3_270m", DEVICE)


# ----------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("mode,names", [("first", SINGLE), ("bot", MULTI), ("bot_minimal", MULTI), ("exact", MULTI)])
@pytest.mark.parametrize("read", ["query", "all"])
@torch.no_grad()
def test_fp32_scores_on_the_device_equal_the_cpu_scores(tiny_llama, mode, names, read):
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, names)
    sentences, labels = make_prompts(encoder, 8, read)
    if read == "all":  # uniform length per call
        sentences, labels = [s for s in sentences if len(s) == 3], [lab for lab in labels if len(lab) == 3]
    prompts = [[encoder.encode({"sentence": s}) for s in sents] for sents in sentences]
    cpu = Scorer(model, encoder, mode, batch_size=3, show_progress=False).label_logprobs(prompts, labels, read=read)
    device = Scorer(on_device(model), encoder, mode, batch_size=3, show_progress=False)
    torch.testing.assert_close(device.label_logprobs(prompts, labels, read=read).cpu(), cpu, **FP32)


@torch.no_grad()
def test_bf16_scores_stay_within_tolerance_and_predict_the_same(gemma_shaped):
    model, tokenizer = gemma_shaped
    encoder = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    prompts, labels = sst2_length_prompts(encoder, PROMPTS)
    assert min(len(encoder.assemble(p, lab)[0]) for p, lab in zip(prompts, labels)) > model.config.sliding_window
    fp32 = Scorer(model, encoder, "first", 8, show_progress=False).label_logprobs(prompts, labels).cpu()
    bf16 = Scorer(on_device(model, torch.bfloat16), encoder, "first", 8, show_progress=False)
    assert_bf16_close(bf16.label_logprobs(prompts, labels).cpu(), fp32)


@pytest.mark.parametrize("model_name,dtype,batch_tokens", [
    ("tiny_llama", torch.float32, None), ("tiny_llama", torch.float32, 4096), ("gemma_shaped", torch.float32, None),
    ("gemma_shaped", torch.bfloat16, None)])
@torch.no_grad()
def test_shared_demonstrations_equal_whole_prompts(request, model_name, dtype, batch_tokens):
    """One demonstration set encoded once, its key/value cache reused by every query, on the device
    (Gemma: a prefix longer than its sliding window; with a token budget, the queries packed several to a
    row, which GPUs do not do by default)."""
    model, tokenizer = request.getfixturevalue(model_name)
    encoder = PromptEncoder(tokenizer, TEMPLATE, SINGLE)
    prompts, labels = sst2_length_prompts(encoder, PROMPTS + 1)
    demonstrations, demo_labels = prompts[0][:-1], labels[0]
    queries = [p[-1] for p in prompts[1:]]
    scorer = Scorer(on_device(model, dtype), encoder, "first", 8, show_progress=False, batch_tokens=batch_tokens)
    shared = scorer.shared_label_logprobs(demonstrations, demo_labels, queries).cpu()
    whole = scorer.label_logprobs([[*demonstrations, q] for q in queries], [demo_labels] * len(queries)).cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(shared, whole, **FP32)
    else:
        assert_bf16_close(shared, whole.float())


@needs_cuda
def test_out_of_memory_halves_the_batch_and_keeps_the_predictions(gemma_shaped, tiny_sst2_root, tmp_path, caplog):
    """A UICL run at batch 4, then the same run at batch 64 in a memory budget (set_per_process_memory_fraction)
    of 3 batches of 4: real CUDA out-of-memory errors halve the batch, and the predictions do not change."""
    from joint_inference.methods.uicl import run_classification
    from joint_inference.runs.root import prompt_encoder

    model, tokenizer = gemma_shaped

    def run(name: str, batch_size: int):
        cfg = compose("unsupervised_icl_llm", [
            "model=tiny_random_llm", "dataset=sst2", f"dataset.data_root={tiny_sst2_root}", "dataset.num_examples=24",
            "N=8", "T=1", "num_repeats=2", "device=cuda", "progress=false", "save_predictions=true",
            f"output_dir={tmp_path / name}"])
        settings, data = settings_of(cfg), task_data(cfg)
        scorer = Scorer(model, prompt_encoder(settings, tokenizer), cfg.label_mode, batch_size, show_progress=False)
        results = run_classification(settings, data, scorer)
        return scorer, results, (tmp_path / name / "predictions.jsonl").read_text()

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _, small_results, small_predictions = run("batch_4", 4)
    batch_of_4 = torch.cuda.max_memory_allocated() - before
    torch.cuda.empty_cache()
    budget = torch.cuda.memory_reserved() + 3 * batch_of_4
    torch.cuda.set_per_process_memory_fraction(budget / torch.cuda.get_device_properties(DEVICE).total_memory)
    try:
        with caplog.at_level(logging.WARNING):
            scorer, large_results, large_predictions = run("batch_64", 64)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert "out of memory: batch size lowered" in caplog.text
    assert scorer.batch_size < 64
    assert large_predictions == small_predictions
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(large_results) == strip(small_results)


# ----------------------------------------------------------------------------------------- whole runs
def test_uicl_run_on_the_device_resumes_and_predicts_as_on_the_cpu(tiny_llama_dir, tiny_sst2_root, tmp_path,
                                                                     monkeypatch):
    """Three rounds on the device; the same run interrupted two thirds of the way through and started again
    ends with the same results; the CPU predicts the same."""
    from joint_inference.runs.root import run_icl as run
    from tests.test_icl import icl_config

    def config(name, device=DEVICE):
        return icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / name, "T=3", f"device={device}",
                          "forward_batch_size=auto", "save_predictions=true")

    def predictions(name):
        return (tmp_path / name / "predictions.jsonl").read_text()

    score, calls, interrupt_at = Scorer.label_logprobs, [], None

    def counted(self, *args, **kwargs):
        """The scorer, counting its calls; the ``interrupt_at``-th stops the run as Ctrl-C would."""
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return score(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "label_logprobs", counted)
    full = run(config("full"))
    total, interrupt_at = len(calls), 2 * len(calls) // 3
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run(config("resumed"))
    calls.clear()
    interrupt_at = None
    resumed = run(config("resumed"))
    assert len(calls) < total  # it went on from where it stopped
    strip = lambda r: {k: v for k, v in r.items() if k != "timing"}  # noqa: E731
    assert strip(resumed) == strip(full) and len(full["rounds"]) == 3
    assert predictions("resumed") == predictions("full")
    run(config("cpu", "cpu"))
    assert predictions("cpu") == predictions("full")


def test_fine_tuning_on_the_device_checkpoints_and_resumes(tiny_llama_dir, tiny_sst2_root, tmp_path):
    """LoRA on the one model copy (the reward is the same weights with the adapters off), a checkpoint
    every 2 steps; a run stopped at step 3 and resumed to 6 ends where a straight run to 6 does."""
    from joint_inference.runs.root import run_finetuning as run
    from tests.test_finetune import overrides

    def train(name, steps):
        results = run(compose("unsupervised_ft_llm", overrides(tmp_path / name, tiny_llama_dir, tiny_sst2_root,
                                                               f"num_iterations={steps}", f"device={DEVICE}")))
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=True), results

    assert train("resumed", 3)[0]["state"]["step"] == 3
    resumed, resumed_results = train("resumed", 6)
    straight, straight_results = train("straight", 6)
    assert resumed_results["settings"]["device"].startswith(DEVICE.type)
    assert resumed["state"]["step"] == straight["state"]["step"] == 6
    for name, value in straight["trainable"].items():
        torch.testing.assert_close(resumed["trainable"][name], value, atol=1e-6, rtol=1e-5)
    assert resumed_results["final"] == straight_results["final"]
    assert (tmp_path / "straight" / "adapter").is_dir()


@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (the [qlora] extra)")
def test_fine_tuning_a_4bit_model_trains_its_adapters(tiny_llama_dir, tiny_sst2_root, tmp_path):
    """model.load_in_4bit: the frozen weights in NF4, the LoRA adapters (the only trainable weights) move, the
    losses stay finite, and the adapter is saved."""
    from joint_inference.runs.root import run_finetuning as run
    from tests.test_finetune import overrides

    results = run(compose("unsupervised_ft_llm", overrides(tmp_path, tiny_llama_dir, tiny_sst2_root, "num_iterations=2",
                                                           f"device={DEVICE}", "model.load_in_4bit=true",
                                                           "model.dtype=bfloat16")))
    losses = [m["loss"] for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert len(losses) == 2 and all(np.isfinite(losses))
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["trainable"]
    assert trained and all("lora" in name for name in trained)
    assert any(value.abs().sum() > 0 for name, value in trained.items() if "lora_B" in name)  # B starts at zero
    assert results["settings"]["device"].startswith("cuda") and (tmp_path / "adapter").is_dir()


# ----------------------------------------------------------------------------------------- OpenFlamingo
@pytest.fixture(scope="module")
def tiny_openflamingo(tmp_path_factory):
    """(folder, model overrides): a tiny OpenFlamingo made by open_flamingo's own factory from a 2-layer CLIP
    registered with open_clip and a 2-layer GPT-NeoX (RedPajama's architecture), its gates opened so that
    images change the scores, saved as the checkpoint that ``model=openflamingo_4b`` loads."""
    open_clip = pytest.importorskip("open_clip")
    open_flamingo = pytest.importorskip("open_flamingo")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    root = tmp_path_factory.mktemp("tiny_openflamingo")
    (root / "tiny_clip.json").write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(root / "tiny_clip.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny_clip").state_dict(), root / "clip.pt")
    tokenizer = train_tokenizer(add_bos=False)
    GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tokenizer) + 7, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=2048, initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    flamingo, _, _ = open_flamingo.create_model_and_transforms(
        clip_vision_encoder_path="tiny_clip", clip_vision_encoder_pretrained=str(root / "clip.pt"),
        lang_encoder_path=str(root / "lm"), tokenizer_path=str(root / "lm"), cross_attn_every_n_layers=1)
    with torch.no_grad():
        for block in flamingo.lang_encoder.gated_cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    torch.save(flamingo.state_dict(), root / "checkpoint.pt")
    return root, ["model=openflamingo_4b", "model.clip_vision_encoder_path=tiny_clip",
                  f"model.clip_vision_encoder_pretrained={root / 'clip.pt'}", f"model.lang_encoder_path={root / 'lm'}",
                  f"model.tokenizer_path={root / 'lm'}", "model.cross_attn_every_n_layers=1",
                  "model.checkpoint=tiny/openflamingo"]


@pytest.fixture()
def openflamingo_overrides(tiny_openflamingo, tmp_path, monkeypatch):
    """Overrides for a run of the tiny OpenFlamingo on 60 random CIFAR-10-schema images; its checkpoint
    is "downloaded" from the folder, the feature cache lives in tmp."""
    import huggingface_hub

    from tests.test_vision import synthetic_images, write_image_parquet

    root, model = tiny_openflamingo
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **_: str(root / filename))
    monkeypatch.setenv("JOINT_INFERENCE_CACHE", str(tmp_path / "cache"))
    write_image_parquet(tmp_path / "data" / "cifar10" / "test.parquet", synthetic_images(60), [i % 10 for i in range(60)])
    return [*model, "dataset=cifar10", f"dataset.data_root={tmp_path / 'data'}", "dataset.num_examples=60",
            f"device={DEVICE}", "progress=false"]


@torch.no_grad()
def test_openflamingo_cached_clip_tokens_score_as_pixels(tiny_openflamingo, openflamingo_overrides):
    """Our path (CLIP patch tokens computed once with open_clip, cached in fp16, each row's cross-attention
    conditioned on its own images) against OpenFlamingo's own forward from pixels, fp32."""
    import open_flamingo

    from joint_inference.models.openflamingo import load_openflamingo
    from joint_inference.prompts.encoders import build_prompt_encoder
    from joint_inference.scoring.scorer import minimal_prefix_lengths

    root, _ = tiny_openflamingo
    cfg = compose("unsupervised_icl_vlm", [*openflamingo_overrides, "model.dtype=float32"])
    settings, data = settings_of(cfg), task_data(cfg)
    model, tokenizer, images = load_openflamingo(settings.model, settings.dataset, DEVICE, data)
    encoder = build_prompt_encoder(tokenizer, settings.template.text, settings.labelset.names, "bot_minimal", images,
                                   settings.model)
    examples = encoder.encode_splits(data)
    scorer = Scorer(model, encoder, "bot_minimal", 3, show_progress=False)
    rng = np.random.default_rng(0)
    chosen = [rng.choice(len(data.train), size, replace=False).tolist() for size in (1, 2, 3, 3)]
    labels = [rng.integers(0, encoder.num_labels, len(c) - 1).tolist() for c in chosen]
    got = scorer.label_logprobs([[examples["train"][i] for i in c] for c in chosen], labels).cpu()

    flamingo, image_processor, _ = open_flamingo.create_model_and_transforms(
        clip_vision_encoder_path="tiny_clip", clip_vision_encoder_pretrained=str(root / "clip.pt"),
        lang_encoder_path=str(root / "lm"), tokenizer_path=str(root / "lm"), cross_attn_every_n_layers=1)
    flamingo.load_state_dict(torch.load(root / "checkpoint.pt", weights_only=True))
    flamingo.to(DEVICE).eval()
    lengths = minimal_prefix_lengths(encoder.label_ids)
    want = []
    for c, labs in zip(chosen, labels):
        ids, positions = encoder.assemble([examples["train"][i] for i in c], labs)
        images = [data.images[data.train[i]["image"]] for i in c]
        pixels = torch.stack([image_processor(image) for image in images])[None, :, None].to(DEVICE)
        lang = torch.tensor([[flamingo.media_token_id if t < 0 else t for t in ids]], device=DEVICE)
        logits = flamingo(vision_x=pixels, lang_x=lang, attention_mask=torch.ones_like(lang)).logits[0, positions[-1]]
        want.append(torch.stack([logits[list(ids_[:m])].float().mean() for ids_, m in zip(encoder.label_ids, lengths)]))
    want = torch.stack(want).log_softmax(-1).cpu()
    torch.testing.assert_close(got, want, atol=5e-3, rtol=1e-3)  # the cache holds fp16 tokens
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert not torch.allclose(got[2], got[3], atol=1e-3)  # the images matter


def test_openflamingo_runs_a_uicl_round_and_a_fine_tuning_step(openflamingo_overrides, tmp_path):
    """On the device in the model's default dtype (bf16 on GPUs that support it)."""
    from joint_inference.runs.root import run_finetuning as fine_tune
    from joint_inference.runs.root import run_icl as uicl

    icl = uicl(compose("unsupervised_icl_vlm", [*openflamingo_overrides, "N=2", "T=1", "num_repeats=1",
                                                f"output_dir={tmp_path / 'uicl'}"]))
    assert [r["round"] for r in icl["rounds"]] == [1] and 0 <= icl["rounds"][0]["test_accuracy"] <= 1
    ft = fine_tune(compose("unsupervised_ft_vlm", [*openflamingo_overrides, "task_encoder=lora", "batch_size=2", "N=2",
                                                   "num_iterations=1", "eval_freq=1", "ckpt_freq=1",
                                                   f"output_dir={tmp_path / 'uft'}"]))
    assert [h["step"] for h in ft["history"]] == [0, 1] and ft["settings"]["device"].startswith(DEVICE.type)
    assert (tmp_path / "uft" / "adapter").is_dir() and (tmp_path / "uft" / "checkpoint.pt").exists()
