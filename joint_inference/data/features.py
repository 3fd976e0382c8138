"""On-disk cache of image features, computed once per (feature model, dataset sample) and reused.

A cache file lives at ``<cache>/features/<kind>/<model>/<dataset>-<sample>.pt`` (``<cache>`` is
``$JOINT_INFERENCE_CACHE`` or ``~/.cache/joint_inference``) and records the settings that made it
(weights, dtype, preprocessing, a digest of the images). Loading it with different settings is an
error that names the settings that differ: stale features would silently change results.
``scripts/precompute_features.py`` fills the cache as an explicit step; runs fill it when missing.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..core.utils import atomic_write, cache_dir, differing_keys, fingerprint_digest, flatten

log = logging.getLogger(__name__)


def images_digest(images, train: list[dict], test: list[dict]) -> str:
    """Stable hash of a task's images (pixels and sizes) and of which rows they belong to."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.size}".encode())
        digest.update(image.tobytes())
    digest.update(json.dumps([[r["row"] for r in train], [r["row"] for r in test]]).encode())
    return digest.hexdigest()[:16]


def cache_path(kind: str, model_name: str, dataset) -> Path:
    # the keys that choose the rows, those the data set has (path, image_field: dataset=local, a cache per file)
    keys = ("source_splits", "test_split", "num_examples", "sample_seed", "hub_id", "hub_config", "filter",
            "path", "image_field", "transductive", "on_bad_row")
    sample = fingerprint_digest({k: str(Path(dataset.path).expanduser().absolute()) if k == "path" else
                                 as_before(getattr(dataset, k)) for k in keys if hasattr(dataset, k)})
    return cache_dir() / "features" / kind / model_name / f"{dataset.name}-{sample}.pt"


def as_before(value):
    """A list or dict as the digest read it from the composed config before (its text), so that caches made
    then are still found."""
    return str(value) if isinstance(value, (list, dict)) else value


def cached_features(kind: str, model_name: str, dataset, settings: dict, compute: Callable[[], dict]) -> dict:
    """The cached tensors for (kind, model, dataset sample); ``compute()`` them and save when missing."""
    path = cache_path(kind, model_name, dataset)
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from disk
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        ours, theirs = flatten(settings), flatten(saved["settings"])
        differ = differing_keys(ours, theirs)
        if differ:
            shown = "; ".join(f"{k}: cached {theirs.get(k)!r}, now {ours.get(k)!r}" for k in differ[:5])
            raise ConfigError(f"the feature cache {path} was built with different settings ({shown}). Delete it "
                              "(or set JOINT_INFERENCE_CACHE elsewhere) and rebuild with scripts/precompute_features.py")
        log.info("%s features of %s loaded from %s", kind, dataset.name, path)
        return saved["data"]
    log.info("computing %s features of %s with %s (cached in %s)", kind, dataset.name, model_name, path)
    data = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save({"settings": settings, "data": data}, f), binary=True)
    return data
