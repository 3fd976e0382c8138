"""bf16 on CPUs at the speed of the matrix units: fused kernels for the element-wise layers.

With bf16 matrix products on AMX, a Gemma-3 forward pass in eager PyTorch spends about half its time
outside them (docs/speed.md has the profile): the RMS norms (six a layer, each upcasting to fp32 in five
separate passes over memory) and the MLP's tanh GELU (a slow vectorised tanh). :func:`speed_up_cpu_bf16`
swaps, in a model that computes in bf16 on a CPU, the forward of

* each RMS norm of a known family, for the same formula compiled into one kernel;
* the family's rotary embedding (``apply_rotary_pos_emb``), compiled as it is;
* each gated MLP (``down(act(gate(x)) * up(x))``) with a tanh GELU or SiLU, for the same layers with
  ``act(gate) * up`` compiled into one kernel. The tanh GELU is computed as ``x * sigmoid(2z)``, equal
  to ``x * (1 + tanh(z)) / 2`` (z = sqrt(2/pi) (x + 0.044715 x^3)): the same function in fp32. Rounded to
  bf16 it gives eager PyTorch's bits for every input above -2.9 but one in a thousand (those by one unit
  in the last place); below, where ``1 + tanh(z)`` cancels, it is the more accurate of the two
  (tests/test_cpu_speed.py goes through all 65,536 bf16 values);

and lets grouped-query attention on bf16 CPU tensors skip the copies of the keys and values per query
head (:func:`attend_grouped_queries`).

The kernels come from ``torch.compile`` with dynamic shapes, once per process for all layers (a few
seconds; fine-tuning compiles their backward too). Each swap is checked against the module it replaces on a
random input before it is made: a module computing something else stays as it is. Where torch.compile
cannot build (no C++ compiler) the modules keep their own forward.
``model.dtype=float32`` never takes this path.
"""
from __future__ import annotations

import logging
import math
import sys
import types

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMS norm: normalised and scaled by ``1 + weight`` in fp32, then rounded once."""
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).type_as(x)


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMS norm: normalised in fp32, rounded, then scaled by ``weight``."""
    out = x.float()
    out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
    return weight * out.to(x.dtype)


def tanh_gelu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up``, the GELU as ``x * sigmoid(2z)`` in fp32 (fast exp, not a slow tanh)."""
    x = gate.float()
    return (x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))).to(gate.dtype) * up


def silu_times(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    return F.silu(gate) * up


NORMS = {  # transformers' class name -> the formula its forward computes
    "Gemma3RMSNorm": gemma_rms_norm, "Gemma2RMSNorm": gemma_rms_norm, "GemmaRMSNorm": gemma_rms_norm,
    "LlamaRMSNorm": llama_rms_norm, "MistralRMSNorm": llama_rms_norm, "Qwen2RMSNorm": llama_rms_norm,
    "Qwen3RMSNorm": llama_rms_norm,
}
GATED_ACTIVATIONS = {"GELUTanh": tanh_gelu_times, "PytorchGELUTanh": tanh_gelu_times,
                     "SiLUActivation": silu_times, "SiLU": silu_times}


class KernelUnavailable(Exception):
    """torch.compile could not build a kernel here."""


class Kernel:
    """A formula compiled once for every module that uses it."""

    def __init__(self, formula):
        self.compiled = torch.compile(formula, dynamic=True)
        self.failed = False

    def __call__(self, *args, **kwargs):
        try:
            return self.compiled(*args, **kwargs)
        except torch.OutOfMemoryError:  # the scorer halves its batch; the kernel is fine
            raise
        except Exception as err:  # no C++ compiler, an unsupported platform: stay eager
            self.failed = True
            log.warning("bf16 CPU kernels off, modules stay eager (torch.compile failed: %s)",
                        str(err).splitlines()[0][:200])
            raise KernelUnavailable from err

    def either(self, fast, eager, *args, **kwargs):
        """``fast(*args)``, which calls this kernel, while it builds; else ``eager(*args)``."""
        if not self.failed:
            try:
                return fast(*args, **kwargs)
            except KernelUnavailable:
                pass
        return eager(*args, **kwargs)


def _swap(module, fast, kernel: Kernel) -> None:
    """``module.forward`` becomes ``fast`` where :meth:`Kernel.either` allows, its class's forward elsewhere
    (bound to the module that runs, so that a deepcopy runs itself)."""
    def forward(self, *args):
        return kernel.either(fast, type(self).forward, self, *args)

    module.forward = types.MethodType(forward, module)


def _agrees(module, replacement, width: int) -> bool:
    """Whether ``replacement`` computes what ``module`` does on a random bf16 input, to bf16's rounding."""
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        expected, got = module(x).float(), replacement(x).float()
    return bool(torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())))


def as_rows(x: torch.Tensor) -> tuple[torch.Tensor, callable]:
    """``x`` viewed as (rows, features), and how to give a result of that shape ``x``'s shape and layout back:
    one compiled kernel then serves every rank and layout (the attention's q/k norms get transposed 4-D
    views) with no recompiling. ``x`` itself where no view exists."""
    if x.is_contiguous():
        return x.view(-1, x.shape[-1]), lambda y: y.view(x.shape)
    if x.dim() == 4 and x.transpose(1, 2).is_contiguous():
        flipped = x.transpose(1, 2)
        return flipped.reshape(-1, x.shape[-1]), lambda y: y.view(flipped.shape).transpose(1, 2)
    return x, lambda y: y


def _norm_forward(module, formula):
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", None))
    if eps is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None

    def forward(self, x, _eps=float(eps)):
        rows, back = as_rows(x)
        return back(formula(rows, self.weight, _eps))

    return forward


def _mlp_forward(module, formula):
    if not all(isinstance(getattr(module, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return None

    def forward(self, x):
        gate, back = as_rows(self.gate_proj(x))
        return self.down_proj(back(formula(gate, as_rows(self.up_proj(x))[0])))

    return forward


def fuse_rotary(model) -> bool:
    """The rotary embedding of ``model``'s family (its modeling module's ``apply_rotary_pos_emb``, six passes over
    the queries and keys) compiled as it is into one kernel, for bf16 CPU tensors; everything else goes to the
    function itself. Whether the family has one."""
    modeling = sys.modules.get(type(model).__module__)
    original = getattr(modeling, "apply_rotary_pos_emb", None)
    if original is None:
        return False
    if getattr(original, "fused_cpu_bf16", False):  # another model of the family was loaded before
        return True
    kernel = Kernel(original)

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            return kernel.either(kernel, original, q, k, cos, sin, *args, **kwargs)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.fused_cpu_bf16 = True
    apply_rotary_pos_emb.original = original
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def attend_grouped_queries() -> None:
    """Grouped-query attention (several query heads to a key/value head, as Gemma-3 and Llama-3 have) on bf16 CPU
    tensors with ``enable_gqa``, so that the keys and values are no longer copied once per query head first.

    transformers asks for it only without a mask (CUDA's kernels need that); PyTorch's CPU attention takes it
    with a mask as well, and computes the same bits (tested). It made attention 1.1-1.75x faster here and a
    fine-tuning step about 10%. Everything else keeps transformers' own rule."""
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.use_gqa_in_sdpa
    if getattr(original, "fused_cpu_bf16", False):
        return

    def use_gqa_in_sdpa(attention_mask, key, value):
        if key.device.type == "cpu" and key.dtype == torch.bfloat16:
            return True
        return original(attention_mask, key, value)

    use_gqa_in_sdpa.fused_cpu_bf16 = True
    use_gqa_in_sdpa.original = original
    sdpa_attention.use_gqa_in_sdpa = use_gqa_in_sdpa


def speed_up_cpu_bf16(model) -> dict[str, int]:
    """Swap the slow element-wise layers of a bf16 ``model`` on a CPU for fused kernels (module doc), and let
    grouped-query attention skip its copies (:func:`attend_grouped_queries`); returns how many modules of each
    kind were swapped (``rotary``: 1 where the family's rotary embedding is)."""
    kernels: dict = {}
    swapped = {"rms_norms": 0, "mlps": 0}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in NORMS:
            what, formula, make = "rms_norms", NORMS[kind], _norm_forward
            width = getattr(getattr(module, "weight", None), "shape", [0])[-1]
        elif type(getattr(module, "act_fn", None)).__name__ in GATED_ACTIVATIONS:
            what, formula, make = "mlps", GATED_ACTIVATIONS[type(module.act_fn).__name__], _mlp_forward
            width = getattr(getattr(module, "gate_proj", None), "in_features", 0)
        else:
            continue
        forward = make(module, formula)  # the formula eager, to check it against the module
        if forward is None or not _agrees(module, types.MethodType(forward, module), width):
            log.info("%s (%s) computes another formula: left as it is", name, kind)
            continue
        kernel = kernels.setdefault(formula, Kernel(formula))
        _swap(module, make(module, kernel), kernel)
        swapped[what] += 1
    swapped["rotary"] = int(fuse_rotary(model))
    attend_grouped_queries()
    return swapped
