"""Small shared helpers: atomic files, devices, seeding."""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def resolve_device(device: str) -> torch.device:
    """``auto`` means this process's GPU when available (one per process under
    ``accelerate launch``), else CPU."""
    if device == "auto":
        from .distributed import process_state

        return process_state().device
    return torch.device(device)


def default_batch_size(device: torch.device) -> int:
    """Prompts per forward pass when ``batch_size=auto``: large on GPUs (halved on
    out-of-memory); small on CPUs, where 4 measured fastest (scripts/bench_scoring.py)."""
    return 64 if device.type == "cuda" else 4


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
