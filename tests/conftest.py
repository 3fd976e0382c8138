"""Shared fixtures: tiny random models with a locally trained tokenizer, tiny datasets, configs.

Nothing here touches the network. Real data in ../shared/data and the embedded real models
are used only by tests marked ``integration`` and skipped when absent.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

from joint_inference.models.tiny import WORDS, tiny_causal_lm, train_tokenizer  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA", REPO.parent / "shared" / "data"))
CONFIG_DIR = str(REPO / "configs")

@pytest.fixture(autouse=True)
def fp32_by_default(monkeypatch):
    """``model.dtype=auto`` means fp32 in tests on every CPU, as on one without bf16 matrix units: the tests
    compare runs against fp32 references computed in the test. The bf16 path is tested where it is named
    (test_models.py), by setting ``model.dtype=bfloat16`` or undoing this patch."""
    from joint_inference.models import language

    monkeypatch.setattr(language, "cpu_has_bf16_matmul", lambda: False)


def tiny_gemma3(**config):
    """(random 2-layer Gemma-3 text model, trained tokenizer): soft-capped logits, a sliding window of 8, q/k
    norms; ``config`` overrides Gemma3TextConfig's values."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = train_tokenizer(add_bos=True)
    config = Gemma3TextConfig(**{"vocab_size": len(tokenizer) + 5, "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "head_dim": 16, "final_logit_softcapping": 0.5, "sliding_window": 8,
                                 "pad_token_id": 0, **config})
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval(), tokenizer


def build_tiny_model(kind: str, directory: Path, **dims) -> Path:
    """Save a random 2-layer model + locally trained tokenizer to ``directory``."""
    model, tokenizer = tiny_causal_lm(kind, **dims)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_gpt2_dir)


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread, restored after: the tiny models' matrices are too small to share out, and with
    two threads a forward pass waits for the second OpenMP thread, which a busy 2-core machine may not
    schedule for a while (seconds per test were lost that way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def tiny_sst2_root(tmp_path) -> Path:
    """A DATA_ROOT holding sst2/train.jsonl: 60 short sentences, 2 balanced classes."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(60):
        idx = torch.randint(len(WORDS), (6,), generator=g)
        rows.append({"idx": i, "sentence": " ".join(WORDS[j] for j in idx), "label": i % 2})
    write_jsonl(tmp_path / "data" / "sst2" / "train.jsonl", rows)
    return tmp_path / "data"


def torchrun_two() -> list[str]:
    """The command prefix that starts two local processes (gloo on CPU) on a free port."""
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port)]


def settings_of(cfg):
    """The typed settings the composition root reads from a composed ``cfg`` (where no ``output_dir`` was set,
    a folder that is never written: outside a Hydra run its default cannot be read)."""
    from omegaconf import OmegaConf

    from joint_inference.runs.config import read_settings

    if OmegaConf.is_interpolation(cfg, "output_dir"):
        cfg = cfg.copy()
        cfg.output_dir = "/nonexistent/output_dir"
    return read_settings(cfg)


def task_data(cfg):
    """The sample of the task a run of the composed ``cfg`` reads, as the composition root loads it."""
    from joint_inference.runs.root import Parts

    return Parts(settings_of(cfg)).data()


def compose(config_name: str, overrides: list[str]):
    """The config a command line with ``overrides`` would give, with the run dir resolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)
