"""Small shared helpers: atomic files, devices, seeding."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ConfigError

log = logging.getLogger(__name__)


TEMPORARY = ".*.tmp"  # what atomic_write writes before it renames: a killed write leaves one behind


class WriteError(ConfigError):
    """A file that could not be written (a full disk, a folder that cannot be written); ``reason`` says why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"could not write {path} ({reason}); free some space on the disk or make the folder "
                         "writable, then start the same command again: what was saved before is kept")
        self.reason = reason


def atomic_write(path: str | Path, write, binary: bool = False, durable: bool = True) -> None:
    """Call ``write(file)`` so that readers see the old file or the new one, never half of it; ``durable``:
    on the disk before this returns (fsync). A disk that is full or a folder that cannot be written is a
    :class:`WriteError` naming the file (the old one stays)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteError(path, err.strerror or str(err)) from None
        raise


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> None:
    atomic_write(path, lambda f: f.write(text), durable=durable)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path, fix: str):
    """The JSON held in ``path``, or a ConfigError naming the file and ``fix`` when it is cut short, empty or
    not JSON (a disk that filled up, a copy interrupted): the run stops before it touches anything else."""
    try:
        return json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is damaged ({err}); {fix}") from None


def cache_dir() -> Path:
    """Where converted models and image features are kept (``$JOINT_INFERENCE_CACHE``)."""
    return Path(os.environ.get("JOINT_INFERENCE_CACHE", Path.home() / ".cache" / "joint_inference"))


def fingerprint_digest(obj) -> str:
    """Short stable hash of JSON-able data (e.g. the sampled rows)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_writable_dir(path: str | Path, key: str) -> None:
    """A ConfigError when ``path`` cannot be created or written: the nearest folder that exists above it
    is a file, or cannot be written (checked without creating anything)."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {existing} is a file; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} cannot be written: {existing} is read-only to this user; choose another {key}")


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts as one dict with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def differing_keys(ours: dict, theirs: dict) -> list[str]:
    """Keys whose values differ between two fingerprints (missing on one side counts)."""
    return sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))


def resolve_device(device: str) -> torch.device:
    """``auto`` means this process's GPU when available (one per process under
    ``accelerate launch``), else CPU; a bare ``cuda`` also means this process's GPU. A CUDA device
    on a machine without one is an error here, before the model loads, not a crash once it is moved."""
    device = str(device)  # device=0 on the command line arrives as a number
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device}, but this machine has no CUDA GPU that PyTorch can use "
                          f"(torch {torch.__version__}); use device=auto or device=cpu")
    if device in ("auto", "cuda"):
        from .distributed import process_state

        state = process_state()
        if device == "auto" or state.device.type == "cuda":
            return state.device
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device={device}: {err}; use auto, cpu, cuda or cuda:<index>") from None


def in_batches_longest_first(lengths: list[int], batch_size: int, process, desc: str | None = None,
                             show_progress: bool = True, max_tokens: int | None = None, packed: bool = False) -> int:
    """Call ``process(indices)`` on batches of item indices, longest items first.

    A batch holds at most ``batch_size`` items and, with ``max_tokens``, at most that many tokens:
    padded (items x the batch's longest, which comes first), or with ``packed`` the items' own
    lengths summed (items laid end to end); but always one item. On an out-of-memory error the batch
    is halved and retried. Returns the batch size that fit, for the caller to keep for its next calls.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    progress = tqdm(total=len(order), desc=desc, disable=not show_progress or desc is None, leave=False)
    start = 0
    while start < len(order):
        rows = batch_size
        if max_tokens is not None and packed:
            rows = min(batch_size, max(1, int(np.searchsorted(
                np.cumsum([lengths[i] for i in order[start : start + batch_size]]), max_tokens, side="right"))))
        elif max_tokens is not None:  # the first item is the batch's longest
            rows = min(batch_size, max(1, max_tokens // max(1, lengths[order[start]])))
        idx = order[start : start + rows]
        try:
            process(idx)
        except torch.OutOfMemoryError:
            if len(idx) == 1:
                raise
            batch_size = (batch_size if max_tokens is None else len(idx)) // 2
            log.warning("out of memory: batch size lowered to %d", batch_size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start += len(idx)
        progress.update(len(idx))
    progress.close()
    return batch_size


CPU_BATCH_TOKENS = 2048  # padded tokens per scoring pass on CPUs (docs/speed.md, scripts/bench_scoring.py)


def resolve_batch_size(value, device: torch.device, cpu_default: int = 4) -> int:
    """``auto``: 64 on GPUs (halved on out-of-memory), ``cpu_default`` on CPUs."""
    if value == "auto":
        return 64 if device.type == "cuda" else cpu_default
    return int(value)


def scoring_batch(value, device: torch.device) -> tuple[int, int | None]:
    """(prompts, padded tokens) that one scoring pass holds at most, for ``forward_batch_size=value``.
    ``auto`` on CPUs: up to 64 prompts that fill :data:`CPU_BATCH_TOKENS`, as bf16 matrix products
    run at full speed only from about 1,500 rows there; on GPUs, 64 prompts. A number: that many prompts."""
    if value == "auto" and device.type == "cpu":
        return 64, CPU_BATCH_TOKENS
    return resolve_batch_size(value, device), None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def report_figures(figures: dict, out: str | None) -> None:
    """Benchmarks: add the machine and the command, print as JSON, and write to ``out`` if given."""
    import platform
    import sys

    figures = {**figures,
               "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
               "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    print(json.dumps(figures, indent=2))
    if out:
        atomic_write_json(out, figures)


Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and keeps its coverage near 0% and
    100% and on the 100-example test sets that many tables rest on.
    """
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)
