"""Image tasks' data: images decoded from the hub's schema or local files, and the protocol's sample.

Rows keep an ``image`` index into ``TaskData.images``; the rest of the project never sees pixels.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError
from .features import images_digest
from .hub import TaskData, capped_subset, class_ids, load_split, protocol_sample

log = logging.getLogger(__name__)


def decode_image(value, where: str):
    """An RGB PIL image from a hub ``Image`` value (``{"bytes", "path"}``), a PIL image or a file path."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, Mapping):
            if value.get("bytes"):
                return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
            value = value.get("path")
        if isinstance(value, (str, Path)) and value:
            with Image.open(value) as image:
                return image.convert("RGB")
        raise ValueError(f"no image data in {type(value).__name__} value")
    except Exception as err:  # PIL raises several types for corrupt files
        raise ConfigError(f"cannot decode the image of {where}: {type(err).__name__}: {err}") from None


def _resolve_paths(ds, column: str, root: Path):
    """Image paths in local files are relative to the file's folder (COCO-QA's documented layout)."""
    import datasets

    if not isinstance(ds.features[column], datasets.Value):
        return ds
    return ds.map(lambda row: {column: str(root / row[column]) if row[column] else row[column]})


def labelled_rows(dataset, splits: Sequence[str], label_names: Sequence[str]):
    """(rows with undecoded images, each row's index in ``splits`` concatenated, labels) of an image task.

    With ``dataset.labels_are_names`` (COCO-QA's free-text answers) a row's label is its answer's position in
    the label set, and rows whose answer is not in the set are dropped.
    """
    import datasets

    parts = []
    for split in splits:
        part = load_split(dataset, split)
        if dataset.image_column not in part.features:
            raise ConfigError(f"{dataset.name!r} split {split!r} has no image column {dataset.image_column!r}; "
                              f"columns: {sorted(part.features)}. Set dataset.image_column=...")
        if isinstance(part.features[dataset.image_column], datasets.Image):
            part = part.cast_column(dataset.image_column, datasets.Image(decode=False))  # decode only what is sampled
        if dataset.data_root:
            part = _resolve_paths(part, dataset.image_column, Path(dataset.data_root).expanduser() / dataset.name)
        parts.append(part)
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    raw = ds[dataset.label_column]
    source_rows = np.arange(len(ds))  # a row's index in the splits, kept through filtering
    if dataset.labels_are_names:
        position = {name: k for k, name in enumerate(label_names)}
        known = [i for i, answer in enumerate(raw) if str(answer).strip().lower() in position]
        if len(known) < len(raw):
            log.warning("%s: %d of %d rows have answers outside the label set and are left out",
                        dataset.name, len(raw) - len(known), len(raw))
        ds, source_rows = ds.select(known), source_rows[known]
        labels = np.asarray([position[str(a).strip().lower()] for a in ds[dataset.label_column]], dtype=np.int64)
    else:
        labels = class_ids(raw, dataset)
    return ds, source_rows, labels


def load_image_task(dataset, label_names: Sequence[str]) -> TaskData:
    """The unlabelled pool and test set of an image task, their images decoded.

    ``dataset.test_split`` null: the protocol's sample of ``dataset.source_splits`` (2/3 pool, 1/3 test). A split
    name: the original's vision protocol, every row of ``source_splits`` the pool and every row of that split
    the test set (the same rows twice when it is a source split, as its COCO-QA runs), each capped at a
    seeded ``num_examples`` when set. Labels are read first, so only the chosen images are decoded. An image
    that cannot be decoded stops the run (``dataset.on_bad_image=stop``) or is dropped with a warning (``skip``).
    """
    pool = labelled_rows(dataset, dataset.source_splits, label_names)
    if dataset.test_split is None:
        train_idx, test_idx = protocol_sample(pool[2], dataset.num_classes, dataset.num_examples, dataset.sample_seed)
        chosen = {"train": (*pool, train_idx), "test": (*pool, test_idx)}
    else:  # the test split is read again only when it is not the pool's own (COCO-QA's is)
        held_out = pool if [dataset.test_split] == list(dataset.source_splits) else labelled_rows(dataset, [dataset.test_split],
                                                                                          label_names)
        chosen = {split: (*table, capped_subset(len(table[2]), dataset.num_examples, dataset.sample_seed))
                  for split, table in (("train", pool), ("test", held_out))}

    images, splits = [], {}
    decoded = {}  # (table, row) -> its image's index in ``images``, or None where it cannot be decoded: once each
    for split, (table, table_rows, table_labels, indices) in chosen.items():
        rows, kept = [], []
        for i in indices.tolist():
            row = table[i]
            cell = row.pop(dataset.image_column)
            if (id(table), i) not in decoded:
                try:
                    images.append(decode_image(cell, f"row {table_rows[i]} of {dataset.name!r} ({split} sample)"))
                    decoded[id(table), i] = len(images) - 1
                except ConfigError as err:
                    if dataset.on_bad_image == "stop":
                        raise ConfigError(f"{err}; set dataset.on_bad_image=skip to leave such rows out") from None
                    log.warning("%s; skipped (dataset.on_bad_image=skip)", err)
                    decoded[id(table), i] = None
            if decoded[id(table), i] is None:
                continue
            rows.append({**{k: v for k, v in row.items() if isinstance(v, (str, int, float))},
                         "row": int(table_rows[i]), "image": decoded[id(table), i]})
            kept.append(i)
        splits[split] = (rows, table_labels[kept])
    (train, train_labels), (test, test_labels) = splits["train"], splits["test"]
    return TaskData(train=train, test=test, train_labels=train_labels, test_labels=test_labels, images=images,
                    images_digest=images_digest(images, train, test))
