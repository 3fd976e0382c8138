"""Model loading: what transformers and bitsandbytes are asked for (loading real weights is the slow tier's and,
for 4-bit, the GPU kit's)."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers
from omegaconf import OmegaConf

import joint_inference.models.language as models
from joint_inference.core.errors import ConfigError
from joint_inference.runs.config import config_option


def test_load_in_4bit_asks_transformers_for_nf4_weights_placed_on_the_gpu(monkeypatch):
    """model.load_in_4bit: QLoRA's NF4 + double quantization computing in model.dtype, placed by bitsandbytes on
    the run's GPU (device_map; never moved with .to() after). On a CPU, or without bitsandbytes, a clear error
    comes before any weights load. (Loading itself needs CUDA: the GPU kit's business.)"""
    cfg = OmegaConf.merge(config_option("model", "llama3.1_8b"), {"load_in_4bit": True, "dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="needs a CUDA GPU .* drop model.load_in_4bit"):
        models.load_model(cfg, torch.device("cpu"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"pip install -e \".\[qlora\]\""):
        models.load_model(cfg, torch.device("cuda", 1))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else
                        find_spec(name, *a))

    class Loaded:
        moved = False

        def to(self, *args, **kwargs):
            Loaded.moved = True
            return self

        def eval(self):
            return self

        def requires_grad_(self, flag):
            return self

    calls = []
    monkeypatch.setattr(models, "load_tokenizer", lambda cfg: "tokenizer")
    monkeypatch.setattr(models, "resolve_weights", lambda cfg: ("meta-llama/Llama-3.1-8B", None))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kwargs: calls.append((source, kwargs)) or Loaded())
    monkeypatch.setattr(models, "resolve_attention", lambda name, device: "sdpa")
    _, tokenizer = models.load_model(cfg, torch.device("cuda", 1))
    (source, kwargs), = calls
    q = kwargs["quantization_config"]
    assert (source, tokenizer, kwargs["device_map"], kwargs["dtype"]) == ("meta-llama/Llama-3.1-8B", "tokenizer",
                                                                         {"": 1}, torch.bfloat16)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (
        True, "nf4", True, torch.bfloat16)
    assert not Loaded.moved
    with pytest.raises(ConfigError, match="random_init"):
        models.load_model(OmegaConf.merge(config_option("model", "tiny_random_llm"), {"load_in_4bit": True}),
                          torch.device("cuda", 0))
