"""Task data: load a dataset's source splits and draw the protocol's sample (docs/protocol.md §7).

Rows come from ``datasets.load_dataset``: the hub by default, or local files
``<data_root>/<local_name>/<split>.{jsonl,parquet,csv}`` in the hub's own schema when
``dataset.data_root`` (default: ``$DATA_ROOT``) is set. Local files are checked before they are read
(empty, not UTF-8, a JSON line cut short), and every source row before the sample is drawn from them
(a row the model cannot score stops the run, or is left out with ``dataset.on_bad_row=skip``).
"""
from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..core.errors import ConfigError

log = logging.getLogger(__name__)
ALL_SUBJECTS = "all"  # dataset.subject=all: every subject of dataset.subjects in turn (MMLU)
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class TaskData:
    """The unlabelled pool ("train") and the test set, with gold labels kept for scoring only.

    A transductive task (MMLU as the original runs it) has one list as both: ``train is test``.
    """

    train: list[dict]
    test: list[dict]
    train_labels: np.ndarray
    test_labels: np.ndarray
    images: list | None = None  # image tasks: decoded images; row["image"] indexes this list
    images_digest: str | None = None  # image tasks: what feature caches check their images against
    # the supervised baseline's labelled demonstrations when they are not the pool's (MMLU: validation)
    supervised_pool: list[dict] | None = None
    supervised_labels: np.ndarray | None = None
    skipped_rows: int = 0  # source rows left out before sampling because they cannot be scored (on_bad_row=skip)

    @property
    def transductive(self) -> bool:
        """The test questions are their own unlabelled pool."""
        return self.train is self.test


def _local_file(root: Path, name: str, split: str) -> Path | None:
    for suffix in LOCAL_FORMATS:
        path = root / name / f"{split}{suffix}"
        if path.exists():
            return path
    return None


def split_source(dataset, split: str) -> str:
    """Where a split's rows come from, for messages: its local file, or the hub id and split."""
    if dataset.data_root:
        root = Path(dataset.data_root).expanduser()
        name = dataset.name
        path = _local_file(root, name, split)
        if path is None:
            have = sorted(p.name for p in (root / name).glob("*")) if (root / name).exists() else []
            raise ConfigError(
                f"no local file for split {split!r} of {dataset.name!r} under {root / name} (found: {have or 'nothing'}); "
                f"expected {split}.jsonl/.parquet/.csv. Pick existing splits with dataset.source_splits=[...]"
            )
        return str(path)
    return f"{dataset.hub_id} (hub), split {split!r}"


def check_text_file(path: Path) -> None:
    """A ConfigError naming the file and line when a local text file is empty, not UTF-8, or (JSON lines)
    holds a line that is not a JSON object, e.g. the last one cut short by an interrupted copy.

    ``datasets`` would fail on these with a traceback (and on an empty file with a bare StopIteration),
    or read bytes that are not UTF-8 as replacement characters without a word.
    """
    fix = "repair or re-export the file (or pick other splits with dataset.source_splits=[...])"
    has_rows = False
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path}, line {number}: not UTF-8 ({err.reason} at byte {err.start} of the "
                                  f"line); re-save the file as UTF-8") from None
            if path.suffix == ".jsonl" and text.strip():
                try:
                    is_object = isinstance(json.loads(text), dict)
                except ValueError:
                    is_object = False
                if not is_object:
                    cut = "" if line.endswith(b"\n") else " (the file ends in the middle of it: cut short?)"
                    raise ConfigError(f"{path}, line {number}: not a JSON object{cut}; {fix}")
            has_rows = has_rows or bool(text.strip())
    if not has_rows:
        raise ConfigError(f"{path} is empty; {fix}")


def load_split(dataset, split: str):
    """One split as a ``datasets.Dataset``, from local files when a data root is set, else the hub."""
    import datasets

    if dataset.data_root:
        path = Path(split_source(dataset, split))
        if path.suffix != ".parquet":
            check_text_file(path)
        try:
            return datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as err:  # the parsers raise many types (a truncated parquet file, mixed column types)
            raise ConfigError(f"could not read {path}: {err.__cause__ or err}; repair or re-export the file") from None
    if not dataset.hub_id:
        raise ConfigError(f"{dataset.name!r} is not on the hub: set DATA_ROOT (or dataset.data_root=...) to a folder "
                          f"holding {dataset.name}/{split}.jsonl (layout: configs/dataset/{dataset.name}.yaml)")
    try:
        return datasets.load_dataset(dataset.hub_id, dataset.hub_config, split=split)
    except Exception as err:  # the hub raises many types; all mean "cannot get it"
        raise ConfigError(
            f"could not load {dataset.hub_id!r} (config {dataset.hub_config}, split {split!r}) from the hub: "
            f"{type(err).__name__}: {err}. Offline? Set DATA_ROOT (or dataset.data_root=...) to a folder holding "
            f"{dataset.name}/{split}.jsonl in the hub's schema."
        ) from None


RowCheck = Callable[[dict], str | None]  # what makes a row unscorable, or None


def load_rows(dataset, splits: Sequence[str] | None = None) -> tuple[list[dict], np.ndarray]:
    """All rows of ``splits`` (default: the source splits), filtered, and their class ids in ``0..K-1``."""
    rows, labels, _ = checked_rows(dataset, splits)
    return rows, labels


def checked_rows(dataset, splits: Sequence[str] | None = None,
                 check: RowCheck | None = None) -> tuple[list[dict], np.ndarray, int]:
    """:func:`load_rows`, each row passed through ``check`` first, and the number of rows left out.

    A row that ``check`` finds unscorable stops the run with its file, index and the fix
    (``dataset.on_bad_row=error``, the default), or is left out before the sample is drawn (``skip``):
    the source rows are checked whether sampled or not, so that what is wrong with a file is said
    whatever the seed, and a skipping run samples among good rows only.
    """
    splits = list(splits or dataset.source_splits)
    check_subject(dataset)
    on_bad_row = dataset.on_bad_row
    rows, origins = [], []
    for split in splits:
        table, kept = load_split(dataset, split), None
        for field, value in (dataset.filter or {}).items():  # on the column: building every row is slow
            values = table.with_format("arrow")[field].to_pylist() if field in table.column_names else []
            selected = [i for i, v in enumerate(values) if v == value]
            table, kept = table.select(selected), selected if kept is None else [kept[i] for i in selected]
        rows.extend(table.to_list())
        source = split_source(dataset, split)
        origins.extend(f"row {i} of {source}" for i in (range(len(table)) if kept is None else kept))
    if not rows:
        raise ConfigError(f"dataset {dataset.name!r} has no rows in splits {splits} after filtering")
    for i, row in enumerate(rows):
        if dataset.label_column not in row:
            raise ConfigError(f"row {i} of {dataset.name!r} has no label column {dataset.label_column!r}; fields: {sorted(row)}")
    skipped = 0
    if check is not None:
        problems = [check(row) for row in rows]
        bad = [i for i, problem in enumerate(problems) if problem]
        if bad and on_bad_row == "error":
            raise ConfigError(f"{origins[bad[0]]} cannot be scored: {problems[bad[0]]} ({len(bad)} of {len(rows)} "
                              "rows cannot; indices count from 0). Fix the data, or leave such rows out with "
                              "dataset.on_bad_row=skip")
        if bad:
            log.warning("%s: %d of %d rows cannot be scored and are left out (dataset.on_bad_row=skip), e.g. %s: %s",
                        dataset.name, len(bad), len(rows), origins[bad[0]], problems[bad[0]])
            rows, skipped = [row for row, problem in zip(rows, problems) if not problem], len(bad)
    return rows, class_ids([r[dataset.label_column] for r in rows], dataset), skipped


def text_field_problem(row: dict, fields: Sequence[str]) -> str | None:
    """What keeps ``row`` from filling a template's text ``fields`` (``sentence``, ``choices[0]``): a
    value that is null, empty, or not text. A field the row lacks is left to the template, which names
    the fields that the rows do have."""
    for field in fields:
        try:
            value = string.Formatter().get_field(field, (), row)[0]
        except (KeyError, IndexError, TypeError, AttributeError):
            continue
        if value is None:
            return f"its field {field!r} is null"
        if not isinstance(value, str):
            return f"its field {field!r} is {type(value).__name__} {value!r}, not text"
        if not value.strip():
            return f"its field {field!r} is empty"
    return None


def check_subject(dataset) -> None:
    """A dataset of several subjects (MMLU) loads the one ``dataset.subject`` names, one of ``dataset.subjects``."""
    if not hasattr(dataset, "subjects") or dataset.subject in dataset.subjects:
        return
    hint = ("; subject=all (every subject in turn) is a run of unsupervised_icl_llm.py, elsewhere name one"
            if dataset.subject == ALL_SUBJECTS else "")
    raise ConfigError(f"unknown subject {dataset.subject!r} of {dataset.name!r}{hint}; valid: {', '.join(dataset.subjects)}")


def class_ids(raw_labels, dataset) -> np.ndarray:
    """Class ids in ``0..K-1`` of the raw label values (through ``dataset.label_map`` when given)."""
    label_map = {str(k): v for k, v in (dataset.label_map or {}).items()}
    labels = []
    for i, raw in enumerate(raw_labels):
        label = label_map.get(str(raw), raw)
        try:
            label = int(label)
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < dataset.num_classes:
            raise ConfigError(
                f"row {i} of {dataset.name!r} has label {raw!r}, not a class id in 0..{dataset.num_classes - 1} "
                "(unlabelled split? choose labelled splits with dataset.source_splits=[...])"
            )
        labels.append(label)
    return np.asarray(labels, dtype=np.int64)


def check_label_set(names, dataset) -> None:
    """The label set must name every class of the dataset, in order, each with some text (YAML reads an
    unquoted ``1`` or ``true`` as a number or a boolean, not a name)."""
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"label {i} of the label set is {name!r}, not a name: each label needs some text; "
                              "quote names in YAML and on the command line (labelset.names=['1','2'])")
    if len(names) != dataset.num_classes:
        raise ConfigError(f"label set has {len(names)} names but dataset {dataset.name!r} has {dataset.num_classes} "
                          "classes; pick a matching labelset=")


def protocol_sample(
    labels: np.ndarray, num_classes: int, num_examples: int | None, seed: int = 42, sampler: str = "stream"
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the unlabelled pool and the test set.

    ``min(num_examples, available) // K`` examples per class without replacement (``num_examples=None``:
    ``available // K``), each class split 2/3 into the pool and 1/3 into the test set. A class with fewer
    rows gives all it has.
    ``sampler="stream"`` draws every class from one generator seeded once; ``"original"`` draws the
    original release's rows: pandas' ``DataFrame.sample(n, random_state=seed)`` on each class's rows,
    i.e. the first n of ``RandomState(seed).permutation``, the generator restarted for every class.
    """
    per_class = (len(labels) if num_examples is None else min(num_examples, len(labels))) // num_classes
    if per_class < 2:
        raise ConfigError(f"{len(labels)} rows / num_examples={num_examples} leave fewer than 2 examples per class")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            log.warning("class %d has %d rows, fewer than the %d per class asked for", c, len(members), per_class)
        size = min(per_class, len(members))
        if sampler == "original":
            chosen = members[np.random.RandomState(seed).permutation(len(members))[:size]]
        else:
            chosen = rng.choice(members, size=size, replace=False)
        cut = len(chosen) * 2 // 3
        train.extend(chosen[:cut])
        test.extend(chosen[cut:])
    train, test = np.asarray(train), np.asarray(test)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def capped_subset(size: int, cap: int | None, seed: int) -> np.ndarray:
    """Indices, in order, of all ``size`` rows, or of a seeded random ``cap`` of them when there are more."""
    if cap is None or cap >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, size=cap, replace=False))


def load_task(dataset, check: RowCheck | None = None) -> TaskData:
    """Rows of a classification task, sampled by the protocol (docs/protocol.md §7), among the rows that
    ``check`` passes (see :func:`checked_rows`).

    With ``dataset.transductive`` (MMLU as the original runs it, §8) the source splits' rows, at most
    ``num_examples`` of them, are both the unlabelled pool and the test set, and the rows of
    ``dataset.supervised_splits`` are the supervised baseline's demonstrations.
    """
    rows, labels, skipped = checked_rows(dataset, check=check)
    if dataset.transductive:
        keep = capped_subset(len(rows), dataset.num_examples, dataset.sample_seed)
        rows, labels = [rows[i] for i in keep], labels[keep]
        demonstrations, demonstration_labels, skipped_demonstrations = checked_rows(dataset, dataset.supervised_splits, check)
        return TaskData(train=rows, test=rows, train_labels=labels, test_labels=labels,
                        supervised_pool=demonstrations, supervised_labels=demonstration_labels,
                        skipped_rows=skipped + skipped_demonstrations)
    train_idx, test_idx = protocol_sample(labels, dataset.num_classes, dataset.num_examples, dataset.sample_seed, dataset.sampler)
    return TaskData(
        train=[rows[i] for i in train_idx],
        test=[rows[i] for i in test_idx],
        train_labels=labels[train_idx],
        test_labels=labels[test_idx],
        skipped_rows=skipped,
    )
