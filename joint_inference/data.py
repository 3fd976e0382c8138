"""Task data: load a dataset's source splits and draw the protocol's sample (METHOD.md §7).

Rows come from ``datasets.load_dataset``: the hub by default, or local files
``<data_root>/<local_name>/<split>.{jsonl,parquet,csv}`` in the hub's own schema when
``dataset.data_root`` (default: ``$DATA_ROOT``) is set.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class TaskData:
    """The unlabelled pool ("train") and the test set, with gold labels kept for scoring only."""

    train: list[dict]
    test: list[dict]
    train_labels: np.ndarray
    test_labels: np.ndarray
    images: list | None = None  # image tasks: decoded images; row["image"] indexes this list
    images_digest: str | None = None  # image tasks: what feature caches check their images against


def _local_file(root: Path, name: str, split: str) -> Path | None:
    for suffix in LOCAL_FORMATS:
        path = root / name / f"{split}{suffix}"
        if path.exists():
            return path
    return None


def load_split(cfg, split: str):
    """One split as a ``datasets.Dataset``, from local files when a data root is set, else the hub."""
    import datasets

    if cfg.get("data_root"):
        root = Path(cfg.data_root).expanduser()
        name = cfg.get("local_name") or cfg.name
        path = _local_file(root, name, split)
        if path is None:
            have = sorted(p.name for p in (root / name).glob("*")) if (root / name).exists() else []
            raise ConfigError(
                f"no local file for split {split!r} of {cfg.name!r} under {root / name} (found: {have or 'nothing'}); "
                f"expected {split}.jsonl/.parquet/.csv. Pick existing splits with dataset.source_splits=[...]"
            )
        return datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    if not cfg.get("hub_id"):
        raise ConfigError(f"{cfg.name!r} is not on the hub: set DATA_ROOT (or dataset.data_root=...) to a folder "
                          f"holding {cfg.get('local_name') or cfg.name}/{split}.jsonl (layout: configs/dataset/{cfg.name}.yaml)")
    try:
        return datasets.load_dataset(cfg.hub_id, cfg.get("hub_config"), split=split)
    except Exception as err:  # the hub raises many types; all mean "cannot get it"
        raise ConfigError(
            f"could not load {cfg.hub_id!r} (config {cfg.get('hub_config')}, split {split!r}) from the hub: "
            f"{type(err).__name__}: {err}. Offline? Set DATA_ROOT (or dataset.data_root=...) to a folder holding "
            f"{cfg.get('local_name') or cfg.name}/{split}.jsonl in the hub's schema."
        ) from None


def load_rows(cfg) -> tuple[list[dict], np.ndarray]:
    """All rows of the source splits (filtered) and their class ids in ``0..K-1``."""
    rows = []
    for split in cfg.source_splits:
        rows.extend(load_split(cfg, split).to_list())
    for field, value in (cfg.get("filter") or {}).items():
        rows = [r for r in rows if r.get(field) == value]
    if not rows:
        raise ConfigError(f"dataset {cfg.name!r} has no rows in splits {list(cfg.source_splits)} after filtering")
    for field in cfg.get("humanize_fields") or []:
        for r in rows:
            r[field] = str(r[field]).replace("_", " ")
    for i, row in enumerate(rows):
        if cfg.label_column not in row:
            raise ConfigError(f"row {i} of {cfg.name!r} has no label column {cfg.label_column!r}; fields: {sorted(row)}")
    return rows, class_ids([r[cfg.label_column] for r in rows], cfg)


def class_ids(raw_labels, cfg) -> np.ndarray:
    """Class ids in ``0..K-1`` of the raw label values (through ``cfg.label_map`` when given)."""
    label_map = {str(k): v for k, v in (cfg.get("label_map") or {}).items()}
    labels = []
    for i, raw in enumerate(raw_labels):
        label = label_map.get(str(raw), raw)
        try:
            label = int(label)
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < cfg.num_classes:
            raise ConfigError(
                f"row {i} of {cfg.name!r} has label {raw!r}, not a class id in 0..{cfg.num_classes - 1} "
                "(unlabelled split? choose labelled splits with dataset.source_splits=[...])"
            )
        labels.append(label)
    return np.asarray(labels, dtype=np.int64)


def check_label_set(names, cfg) -> None:
    """The label set must name every class of the dataset, in order."""
    if len(names) != cfg.num_classes:
        raise ConfigError(f"label set has {len(names)} names but dataset {cfg.name!r} has {cfg.num_classes} "
                          "classes; pick a matching labelset=")


def protocol_sample(
    labels: np.ndarray, num_classes: int, num_examples: int, seed: int = 42
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the unlabelled pool and the test set.

    ``min(num_examples, available) // K`` examples per class without replacement, each class
    split 2/3 into the pool and 1/3 into the test set. A class with fewer rows gives all it has.
    """
    per_class = min(num_examples, len(labels)) // num_classes
    if per_class < 2:
        raise ConfigError(f"{len(labels)} rows / num_examples={num_examples} leave fewer than 2 examples per class")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            log.warning("class %d has %d rows, fewer than the %d per class asked for", c, len(members), per_class)
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False)
        cut = len(chosen) * 2 // 3
        train.extend(chosen[:cut])
        test.extend(chosen[cut:])
    train, test = np.asarray(train), np.asarray(test)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def load_task(cfg) -> TaskData:
    """Rows of a classification task, sampled by the protocol."""
    rows, labels = load_rows(cfg)
    train_idx, test_idx = protocol_sample(labels, cfg.num_classes, cfg.num_examples, cfg.sample_seed)
    return TaskData(
        train=[rows[i] for i in train_idx],
        test=[rows[i] for i in test_idx],
        train_labels=labels[train_idx],
        test_labels=labels[test_idx],
    )
