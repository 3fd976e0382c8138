"""bf16 on CPUs: the fused element-wise kernels (models/cpu_speed.py) and token-budget batches of the scorer."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from joint_inference.core.utils import CPU_BATCH_TOKENS, in_batches_longest_first, scoring_batch
from joint_inference.models import cpu_speed
from joint_inference.models.tiny import tiny_causal_lm
from tests.conftest import tiny_gemma3


@pytest.fixture(autouse=True)
def transformers_functions_restored():
    """fuse_rotary and attend_grouped_queries replace a transformers module's function for the whole process: each
    test starts from and leaves transformers' own."""
    from transformers.integrations import sdpa_attention
    from transformers.models.gemma3 import modeling_gemma3
    from transformers.models.llama import modeling_llama

    def originals():
        for modeling in (modeling_gemma3, modeling_llama):
            modeling.apply_rotary_pos_emb = getattr(modeling.apply_rotary_pos_emb, "original",
                                                    modeling.apply_rotary_pos_emb)
        sdpa_attention.use_gqa_in_sdpa = getattr(sdpa_attention.use_gqa_in_sdpa, "original",
                                                 sdpa_attention.use_gqa_in_sdpa)

    originals()
    yield
    originals()


def bf16_gemma3():
    """tiny_gemma3 wider, without soft-capping, its norms' weights drawn (Gemma's start at 0, a scale of 1), in bf16."""
    model, tokenizer = tiny_gemma3(hidden_size=64, intermediate_size=128, head_dim=32, final_logit_softcapping=None)
    model.requires_grad_(False)
    for module in model.modules():
        if type(module).__name__ == "Gemma3RMSNorm":
            module.weight.normal_(0, 0.3)
    return model.to(torch.bfloat16), tokenizer


def batch_of(tokenizer, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["the movie was good and the plot was fun", "awful", "the actors were great but the story was boring"]


def test_formulas_equal_the_modules_they_replace_in_fp32():
    """In fp32 each formula is the transformers module's computation, to the last bit."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(4, 7, 48)
    gemma, llama = Gemma3RMSNorm(48, eps=1e-6), LlamaRMSNorm(48, eps=1e-5)
    gemma.weight.data.normal_()
    llama.weight.data.normal_()
    assert torch.equal(cpu_speed.gemma_rms_norm(x, gemma.weight, 1e-6), gemma(x))
    assert torch.equal(cpu_speed.llama_rms_norm(x, llama.weight, 1e-5), llama(x))
    gate, up = torch.randn(2, 3, 1000) * 4, torch.randn(2, 3, 1000)
    torch.testing.assert_close(cpu_speed.tanh_gelu_times(gate, up), F.gelu(gate, approximate="tanh") * up,
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(cpu_speed.silu_times(gate, up), F.silu(gate) * up)


def test_sigmoid_gelu_is_pytorchs_tanh_gelu_in_bf16_where_that_is_accurate():
    """Every bf16 value through both: the same bits down to x = -2.9 (but for one in 1,000, by one unit in the last
    place); below, where PyTorch's ``1 + tanh(z)`` cancels, the sigmoid form is the closer to the fp64 value."""
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.uint16).view(torch.bfloat16)
    every = every[torch.isfinite(every)]
    want = F.gelu(every, approximate="tanh")
    got = cpu_speed.tanh_gelu_times(every, torch.ones_like(every))
    x = every.double()
    truth = x * torch.sigmoid(2 * (2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3))
    above = x > -2.9
    differ = (got != want) & above
    assert differ.float().sum() / above.float().sum() < 1e-3
    ulps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
    assert int(torch.cat([ulps[differ], ulps.new_zeros(1)]).max()) <= 1
    below = ~above & (got != want)
    assert below.any()  # the cancellation is there to be avoided
    assert bool(((got.double() - truth).abs() <= (want.double() - truth).abs())[below].all())
    assert float((got.double() - want.double()).abs()[below].max()) < 1e-2


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_fused_model_scores_what_the_eager_model_scores(arch):
    """Swapped in a bf16 model: every norm and gated MLP, logits within bf16's rounding of the eager model's, with
    autograd (fine-tuning) too."""
    if arch == "gemma3":
        model, tokenizer = bf16_gemma3()
        want = {"rms_norms": 2 * 4 + 2 * 2 + 1, "mlps": 2, "rotary": 1}  # 4 per layer, q/k norms, the final norm
    else:
        model, tokenizer = tiny_causal_lm("llama")
        model = model.to(torch.bfloat16).requires_grad_(False)
        want = {"rms_norms": 2 * 2 + 1, "mlps": 2, "rotary": 1}
    ids, mask = batch_of(tokenizer, TEXTS)
    with torch.inference_mode():
        expected = model(ids, attention_mask=mask).logits
    assert cpu_speed.speed_up_cpu_bf16(model) == want
    with torch.inference_mode():
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    scale = float(expected[real].abs().max())
    for logits in (got, model(ids, attention_mask=mask).logits.detach()):  # without and with autograd
        assert float((logits[real] - expected[real]).abs().max()) <= 0.05 * scale
        assert float((logits[real] - expected[real]).abs().mean()) <= 0.005 * scale


def test_grouped_query_attention_without_copies_computes_the_same_bits():
    """enable_gqa on bf16 CPU tensors, with the padding mask: the same logits, bit for bit, as with the keys and
    values copied per query head (tiny Gemma-3: 2 query heads per key/value head), and the same gradients to
    bf16's rounding; fp32 keeps transformers' rule."""

    model, tokenizer = bf16_gemma3()
    model.model.embed_tokens.weight.requires_grad_(True)
    ids, mask = batch_of(tokenizer, TEXTS)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("enable_gqa", False))
        return sdpa(*args, **kwargs)

    def logits_and_gradient():
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        logits.float().square().mean().backward()
        return logits.detach(), model.model.embed_tokens.weight.grad.clone()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        copied = logits_and_gradient()
        assert calls and not any(calls)  # transformers' rule: a mask, so copies
        cpu_speed.attend_grouped_queries()
        calls.clear()
        grouped = logits_and_gradient()
        assert calls and all(calls)
        assert torch.equal(grouped[0], copied[0])
        # the key/value gradients of a group's query heads are summed inside the kernel, not after it: rounding
        scale = float(copied[1].abs().max())
        torch.testing.assert_close(grouped[1].float(), copied[1].float(), rtol=0.02, atol=0.01 * scale)
        calls.clear()
        model.float()(ids, attention_mask=mask)
        assert calls and not any(calls)


def lora_gradients(model, ids, mask) -> torch.Tensor:
    """The LoRA parameters' gradients (all in one vector, fp32) of the next-token loss on the real tokens."""
    logits = model(ids, attention_mask=mask).logits.float()
    real = mask[:, 1:].bool()
    F.cross_entropy(logits[:, :-1][real], ids[:, 1:][real]).backward()
    grads = [p.grad for n, p in sorted(model.named_parameters()) if p.requires_grad]
    assert grads and {p.dtype for p in grads} == {torch.float32}  # fp32 parameters, fp32 gradients
    return torch.cat([g.flatten() for g in grads])


def test_bf16_fine_tuning_through_the_kernels_follows_the_fp32_gradients():
    """A bf16 step as fine-tuning takes it on a CPU (the fused kernels, forward and backward, and the adapters
    computing in bf16 with fp32 parameters) gives the fp32 model's LoRA gradients to bf16's rounding: no
    further from them than eager bf16 with peft's fp32 adapters is."""
    from peft import LoraConfig, get_peft_model

    from joint_inference.methods.finetune import adapters_in_bf16, add_lora, forward_in_bf16

    bf16, tokenizer = bf16_gemma3()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    exact = add_lora(copy.deepcopy(bf16).float(), r=4, alpha=8, dropout=0.0, target_modules=targets)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # adapters away from their start (B = 0), so that every gradient is non-zero
        for name, p in exact.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    adapters = {n: p for n, p in exact.state_dict().items() if "lora_" in n}

    fast = copy.deepcopy(bf16)
    cpu_speed.speed_up_cpu_bf16(fast)
    fast = add_lora(fast, r=4, alpha=8, dropout=0.0, target_modules=targets)  # bf16 on a CPU: adapters in bf16
    wrapped = [m for m in fast.modules() if getattr(m.forward, "__func__", None) is forward_in_bf16]
    assert len(wrapped) == 2 * len(targets)  # every adapted layer of the 2 layers
    twin = copy.deepcopy(fast)  # a copy's layers run themselves, not the original's
    assert all(m.forward.__self__ is m for m in twin.modules()
               if getattr(m.forward, "__func__", None) is forward_in_bf16)
    assert adapters_in_bf16(twin) == len(wrapped)
    eager = get_peft_model(copy.deepcopy(bf16), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for model in (fast, eager):
        model.load_state_dict(adapters, strict=False)
    ids, mask = batch_of(tokenizer, TEXTS)
    want = lora_gradients(exact, ids, mask)
    error = {name: float((lora_gradients(model, ids, mask) - want).norm() / want.norm())
             for name, model in (("fast", fast), ("eager", eager))}
    # bf16 itself moves this random model's gradients by ~10%; a wrong backward would move them by ~100%
    assert error["fast"] <= 1.5 * error["eager"] + 0.02 and error["eager"] < 0.25, error


def test_a_module_computing_another_formula_is_left_alone(caplog):
    """A norm class of a known name whose forward is not the known formula keeps its forward."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class LlamaRMSNormVariant(LlamaRMSNorm):
        def forward(self, x):
            return super().forward(x) + 1.0

    LlamaRMSNormVariant.__name__ = "LlamaRMSNorm"
    model = torch.nn.Sequential(LlamaRMSNorm(16), LlamaRMSNormVariant(16)).to(torch.bfloat16)
    forwards = [m.forward for m in model]
    with caplog.at_level(logging.INFO):
        assert cpu_speed.speed_up_cpu_bf16(model) == {"rms_norms": 1, "mlps": 0, "rotary": 0}
    assert model[1].forward == forwards[1] and model[0].forward != forwards[0]
    assert "computes another formula" in caplog.text


def test_without_a_compiler_the_modules_stay_eager(monkeypatch, caplog):
    """A kernel that cannot be built (no C++ compiler) leaves every module on its own forward, said once."""
    def broken(*args, **kwargs):
        def call(*a):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return call

    model, tokenizer = bf16_gemma3()
    eager = copy.deepcopy(model)
    monkeypatch.setattr(cpu_speed.torch, "compile", broken)
    cpu_speed.speed_up_cpu_bf16(model)
    ids, mask = batch_of(tokenizer, TEXTS)
    with torch.inference_mode(), caplog.at_level(logging.WARNING):
        got = model(ids, attention_mask=mask).logits
        assert torch.equal(got, eager(ids, attention_mask=mask).logits)
        assert torch.equal(model(ids, attention_mask=mask).logits, got)
    assert caplog.text.count("torch.compile failed: InvalidCxxCompiler") == 3  # once per kernel: norms, MLPs, rotary
    twin = copy.deepcopy(model)  # a copy's eager modules run on the copy's weights, not the original's
    with torch.no_grad():
        twin.model.norm.weight.add_(1.0)
    with torch.inference_mode():
        assert not torch.equal(twin(ids, attention_mask=mask).logits, got)
        assert torch.equal(model(ids, attention_mask=mask).logits, got)


def test_load_model_fuses_bf16_on_cpu_only(tiny_llama_dir, caplog):
    from omegaconf import OmegaConf

    from joint_inference.models.language import load_model

    def config(dtype):
        return OmegaConf.create({"name": "tiny", "embedded": None, "pretrained": str(tiny_llama_dir), "gguf_file": None,
                                 "tokenizer": None, "random_init": None, "load_in_4bit": False, "dtype": dtype,
                                 "attn_implementation": "sdpa"})

    with caplog.at_level(logging.INFO):
        fused, _ = load_model(config("bfloat16"), torch.device("cpu"))
    assert "fused kernels for 5 RMS norms, 2 MLPs and the rotary embedding, grouped-query attention" in caplog.text
    assert fused.model.norm.forward.__func__ is not type(fused.model.norm).forward
    caplog.clear()
    with caplog.at_level(logging.INFO):
        exact, _ = load_model(config("float32"), torch.device("cpu"))
    assert "fused" not in caplog.text
    assert all(m.forward.__func__ is type(m).forward for m in exact.modules() if hasattr(m, "forward"))


# ------------------------------------------------------------------------------------ token budgets
@pytest.mark.parametrize("max_tokens", [None, 1, 10, 25, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_batches_hold_at_most_the_token_budget(max_tokens, packed):
    """Longest first; each batch within the rows and token limits (padded: rows x longest; packed: the lengths'
    sum), or a single item; all items once."""
    lengths = [3, 17, 8, 8, 1, 30, 12, 5, 9, 2, 40, 4]
    batches = []
    in_batches_longest_first(lengths, 5, batches.append, show_progress=False, max_tokens=max_tokens, packed=packed)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)

    def tokens(batch):
        return sum(lengths[i] for i in batch) if packed else len(batch) * max(lengths[i] for i in batch)

    for batch in batches:
        assert len(batch) <= 5
        if max_tokens is not None and len(batch) > 1:
            assert tokens(batch) <= max_tokens
        if max_tokens is not None:  # greedy: the next item would not have fitted
            nxt = flat.index(batch[-1]) + 1
            if nxt < len(flat) and len(batch) < 5:
                assert tokens([*batch, flat[nxt]]) > max_tokens


def test_out_of_memory_halves_a_token_budget_batch():
    seen = []

    def process(idx):
        seen.append(list(idx))
        if len(idx) > 2:
            raise torch.OutOfMemoryError("out of memory")

    assert in_batches_longest_first([4] * 10, 64, process, show_progress=False, max_tokens=32) == 2
    assert [len(b) for b in seen] == [8, 4, 2, 2, 2, 2, 2]


def test_scoring_batch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert scoring_batch("auto", cpu) == (64, CPU_BATCH_TOKENS)
    assert scoring_batch("auto", cuda) == (64, None)
    assert scoring_batch(8, cpu) == (8, None)


def test_new_batch_shapes_compile_nothing_new():
    """After batches of one and of several rows and tokens, other sizes reuse the kernels: the q/k norms' transposed
    4-D inputs go in as row views of the same kernel, so no shape recompiles (nor reaches dynamo's limit)."""
    from torch._dynamo.utils import counters

    model, _ = bf16_gemma3()
    cpu_speed.speed_up_cpu_bf16(model)
    with torch.inference_mode():
        for batch, length in [(1, 1), (1, 4), (2, 1), (2, 3)]:
            model(torch.randint(3, 50, (batch, length)))
        graphs = counters["stats"]["unique_graphs"]
        for batch, length in [(3, 7), (5, 2), (4, 11), (7, 5)]:
            model(torch.randint(3, 50, (batch, length)))
    assert counters["stats"]["unique_graphs"] == graphs
