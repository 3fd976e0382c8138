"""Random-initialised language models with real models' shapes, built directly on the device.

Real weights cannot travel to the GPU machines we test on (Gemma-3-270M's file alone is 253 MB), and
speed and memory depend on a model's shape, not its weights: the GPU checks and benchmarks build these.
The tokenizer is the tiny locally trained one; the vocabulary (and so the output layer) has the real size.
"""
from __future__ import annotations

import torch

SHAPES = {
    # meta-llama/Llama-3.1-8B (its llama3 RoPE scaling left out: it changes no cost)
    "llama3.1_8b": ("llama", {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}),
    # google/gemma-3-270m, as its cached config.json gives it (sliding-window layers, 262k vocabulary)
    "gemma3_270m": ("gemma3_text", {
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768,
        "sliding_window": 512, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "final_logit_softcapping": None,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3}),
    # the tests' 2-layer Llama: the benchmarks' code paths on a CPU
    "tiny": ("llama", {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 4096, "tie_word_embeddings": False}),
}


def random_lm(shape: str, device: torch.device | str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """(random causal LM of ``shape`` on ``device`` in ``dtype``, frozen and in eval mode; tokenizer).

    Built under the device, so an 8B model is initialised on the GPU in seconds instead of on the CPU.
    The same seed gives the same weights on the same kind of device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .tiny import train_tokenizer

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
    model_type, dims = SHAPES[shape]
    tokenizer = train_tokenizer()
    config = AutoConfig.for_model(model_type, **{**dims, **overrides}, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False), tokenizer


def model_bytes(model) -> int:
    """Bytes of a model's parameters and buffers: one copy of its weights."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
