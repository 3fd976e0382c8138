"""The one place that builds a vLLM engine (``backend=vllm``) from a ``model/`` config.

Scoring and generation load their model through :func:`build_vllm_engine`, so both refuse the same
configurations, with the same messages, before vLLM loads any weights, and both spread the model
over the same GPUs. vLLM is imported inside: machines without it import this module freely.
"""
from __future__ import annotations

import importlib.util

import torch

from ..core.errors import ConfigError


def check_vllm() -> None:
    """A ConfigError naming the way out unless vLLM is installed and a CUDA GPU is visible."""
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("backend=vllm needs vLLM, which is not installed: pip install vllm "
                          "(Linux with a CUDA GPU); or use the default backend=hf")
    if not torch.cuda.is_available():
        raise ConfigError("backend=vllm needs a CUDA GPU and none is visible; use backend=hf on this machine")


def build_vllm_engine(model, *, seed: int = 0, min_version: str | None = None, **engine_args):
    """A ``vllm.LLM`` for ``model`` over ``model.tensor_parallel_size`` GPUs (default: all visible).

    The weights are ``model.pretrained`` (or the embedded snapshot), read with ``model.tokenizer`` (default:
    the weights' own) in ``model.dtype`` (default ``auto``). ``min_version``: the oldest vLLM that the
    caller's ``engine_args`` (passed to ``vllm.LLM`` as they are) work with. A missing vLLM or GPU, an old
    vLLM and weights vLLM cannot read are ConfigErrors raised before any weights load.
    """
    from .language import resolve_weights

    check_vllm()  # before resolve_weights converts any embedded weights
    if model.random_init:
        raise ConfigError("backend=vllm loads weights from model.pretrained; model.random_init builds them in "
                          "memory: use backend=hf")
    source, gguf_file = resolve_weights(model)
    if gguf_file:
        raise ConfigError("backend=vllm reads a model directory or hub id, not model.gguf_file; use backend=hf")
    import vllm
    from packaging.version import Version

    if min_version is not None and Version(vllm.__version__) < Version(min_version):
        raise ConfigError(f"this use of backend=vllm needs vLLM >= {min_version}, found {vllm.__version__}: "
                          "pip install -U vllm")
    if model.load_in_4bit:  # vLLM's in-flight bitsandbytes 4-bit quantization
        engine_args = {"quantization": "bitsandbytes", **engine_args}
    return vllm.LLM(model=source, tokenizer=model.tokenizer or source, dtype=model.dtype,
                    seed=seed, tensor_parallel_size=model.tensor_parallel_size or torch.cuda.device_count(),
                    **engine_args)
