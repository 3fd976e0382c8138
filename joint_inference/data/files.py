"""Your own data (``dataset=local``): one CSV, TSV, JSON Lines or Parquet file, labelled or not.

    python unsupervised_icl_llm.py dataset=local dataset.path=reviews.csv dataset.text_fields=[text] \\
        labelset.names=[negative,positive] template.text="{text}\\nThe sentiment is {y}."

Without ``dataset.label_field`` the run is predict-only and transductive, as MMLU runs: the whole
file (or a seeded ``dataset.num_examples`` of its rows) is both the unlabelled pool and the
queries, no accuracy exists, and the run's product is each row's labels: ``predictions.csv`` (the
file's columns plus the labels of every round, the final label and its vote margin) and
``predictions.jsonl``. With a label column the same rows are labelled the same way (the labels are
never read by the method) and the accuracies are reported against it.

Bad input stops the run before any model loads, with a :class:`~joint_inference.core.errors.ConfigError`
that names the problem and the fix.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError
from ..core.settings import LocalDataSettings
from ..prompts.templates import Template
from .hub import RowCheck, TaskData, capped_subset, protocol_sample, text_field_problem

log = logging.getLogger(__name__)
FORMATS = {".csv": "CSV", ".tsv": "TSV", ".jsonl": "JSON Lines", ".json": "JSON Lines (or a JSON array of objects)",
           ".parquet": "Parquet"}
EXAMPLE_COMMAND = ('python unsupervised_icl_llm.py dataset=local dataset.path=reviews.csv dataset.text_fields=[text] '
                   'labelset.names=[negative,positive] template.text="{text}\\nThe sentiment is {y}."')


@dataclass
class FileData(TaskData):
    """A task read from one file: :class:`TaskData` plus where its rows came from.

    ``train_labels``/``test_labels`` are None when the file has no label column (predict-only).
    """

    path: str = ""
    columns: list[str] = field(default_factory=list)
    rows_in_file: int = 0
    source_rows: dict = field(default_factory=dict)  # split -> the rows' 0-based positions among the file's rows
    file_rows: dict = field(default_factory=dict)  # split -> the rows as read (image tasks' rows hold image indices)
    label_field: str | None = None

    @property
    def labelled(self) -> bool:
        return self.test_labels is not None


def labelled(data: TaskData) -> bool:
    """Whether a task has gold labels to score against (every task but an unlabelled file)."""
    return data.test_labels is not None


# ------------------------------------------------------------------------------------ reading
def read_table(path: Path) -> tuple[list[dict], list[str], list[str]]:
    """(rows, column names in order, where each row is in the file: ``line 7`` / ``row 7``)."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"dataset.path={str(path)!r}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
                          f"dataset=local reads {', '.join(FORMATS)} files. Save it as CSV with a header row, JSON "
                          "Lines or Parquet, named with that suffix")
    reader = {".csv": read_csv, ".tsv": lambda p: read_csv(p, "\t"), ".jsonl": read_json_lines, ".json": read_json,
              ".parquet": read_parquet}[suffix]
    try:
        return reader(path)
    except ConfigError:
        raise
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 "
                          f"{FORMATS[suffix]}") from None
    except Exception as err:  # noqa: BLE001 -- csv, json and pyarrow raise many types; all mean "not this format"
        raise ConfigError(f"cannot read {path} as {FORMATS[suffix]}: {type(err).__name__}: {err}. Check the file "
                          f"is {FORMATS[suffix]} (or rename it to its format's suffix: {', '.join(FORMATS)})") from None


def read_csv(path: Path, delimiter: str = ",") -> tuple[list[dict], list[str], list[str]]:
    """Every cell as text (a number stays as written); blank lines skipped; a header row required. A cell may be
    as long as a document is (the csv module's own limit is 128 KiB): the model's context decides what is too long."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"{path} is empty; dataset=local needs a header row naming the columns, then one row "
                              "per example")
        columns = [name.strip() for name in header]
        check_column_names(columns, path)
        rows, where = [], []
        line = reader.line_num
        for values in reader:
            start, line = line + 1, reader.line_num
            if not values:
                continue
            if len(values) != len(columns):
                raise ConfigError(f"{path} line {start} has {len(values)} fields but the header has {len(columns)} "
                                  f"({', '.join(columns)}); quote fields that contain {delimiter!r} or line breaks "
                                  "(\"like, this\")")
            rows.append(dict(zip(columns, values)))
            where.append(f"line {start}")
    return rows, columns, where


def check_column_names(columns: Sequence[str], path: Path) -> None:
    if any(not name for name in columns):
        raise ConfigError(f"{path}: the header row has an empty column name ({list(columns)}); name every column")
    repeated = sorted({name for name in columns if list(columns).count(name) > 1})
    if repeated:
        raise ConfigError(f"{path}: the header row names {repeated} more than once; give each column its own name")


def read_json_lines(path: Path) -> tuple[list[dict], list[str], list[str]]:
    rows, where = [], []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path} line {number} is not JSON ({err.msg} at column {err.colno}); each line of "
                                  'a JSON Lines file is one object, like {"text": "...", "label": "..."}') from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {number} is a JSON {type(row).__name__}, not an object; each line is "
                                  'one example as an object, like {"text": "..."}')
            rows.append(row)
            where.append(f"line {number}")
    return rows, columns_of(rows), where


def read_json(path: Path) -> tuple[list[dict], list[str], list[str]]:
    """A ``.json`` file: a JSON array of objects, or JSON Lines."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.lstrip().startswith("["):
        return read_json_lines(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); write a JSON array of "
                          "objects, or one object per line (JSON Lines)") from None
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ConfigError(f"{path}: item {bad} of the array is a {type(rows[bad]).__name__}, not an object; write one "
                          'object per example, like {"text": "..."}')
    return rows, columns_of(rows), [f"item {i}" for i in range(len(rows))]


def read_parquet(path: Path) -> tuple[list[dict], list[str], list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    columns = list(table.column_names)
    check_column_names(columns, path)
    rows = table.to_pylist()
    return rows, columns, [f"row {i}" for i in range(len(rows))]


def columns_of(rows: Sequence[dict]) -> list[str]:
    """The keys of all rows, in the order first seen."""
    return list(dict.fromkeys(key for row in rows for key in row))


def is_empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def show(locations: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(locations) - limit} more" if len(locations) > limit else ""
    return ", ".join(locations[:limit]) + more


# ------------------------------------------------------------------------------------ the task
def check_local_settings(ds: LocalDataSettings, names: Sequence[str] | None, template: str | None) -> None:
    """dataset.path, labelset.names and template.text set, before the file is read."""
    if not ds.path:
        raise ConfigError(f"dataset=local reads one file: set dataset.path=<file.csv|.jsonl|.parquet>, e.g. "
                          f"{EXAMPLE_COMMAND}")
    if not names:
        raise ConfigError("dataset=local needs the label names: set labelset.names=[name1,name2,...] (the words the "
                          "model writes for each class, e.g. labelset.names=[negative,positive])")
    if not template:
        fields = list(ds.text_fields or ["text"])
        suggestion = ("<image>A photo of {y}.<|endofchunk|>" if ds.image_field else
                      "\\n".join("{" + f + "}" for f in fields) + "\\nThe answer is {y}.")
        raise ConfigError(f'dataset=local needs a prompt: set template.text="{suggestion}" (the input fields in '
                          "braces, {y} where the label goes)")


def load_file_task(ds: LocalDataSettings, label_names: Sequence[str] | None, template_text: str | None,
                   row_check: Callable[[], RowCheck] | None = None) -> FileData:
    """The rows of ``ds.path`` as a task: transductive (every row a query and a pool example) unless a
    labelled file asks for the protocol's 2/3-1/3 split (``dataset.transductive=false``). ``row_check()``:
    what else keeps a text row from being scored (an example longer alone than the model's context), built
    once the file has been read."""
    check_local_settings(ds, label_names, template_text)
    names = [str(n) for n in label_names]
    path = Path(str(ds.path)).expanduser()
    if not path.exists():
        raise ConfigError(f"dataset.path={ds.path}: no such file ({path.absolute()}); give the path of a CSV, JSON "
                          f"Lines or Parquet file (a relative path starts at {Path.cwd()})")
    if path.is_dir():
        raise ConfigError(f"dataset.path={ds.path} is a folder; give one file ({', '.join(FORMATS)})")
    rows, columns, where = read_table(path)
    if not rows:
        raise ConfigError(f"{path} has a header but no rows; add one row per example")
    template = Template(template_text)
    inputs = list(dict.fromkeys([*(ds.text_fields or []), *template.fields]))
    image_field = ds.image_field
    for key, wanted in (("template.text", template.fields), ("dataset.text_fields", list(ds.text_fields or [])),
                        ("dataset.image_field", [image_field] if image_field else []),
                        ("dataset.label_field", [ds.label_field] if ds.label_field else [])):
        missing = [f for f in wanted if f not in columns]
        if missing:
            raise ConfigError(f"{key} names {missing}, but {path.name} has no such column; its columns are "
                              f"{columns}. Rename the column in the file or set {key} to one of its columns")
    if not inputs and not image_field:
        raise ConfigError(f"the template {template_text!r} reads no field of the file; put the input columns in "
                          f"braces, e.g. template.text=\"{{{columns[0]}}}\\nThe answer is {{y}}.\"")
    label_field = ds.label_field
    if label_field and label_field in inputs:
        raise ConfigError(f"dataset.label_field={label_field!r} is also an input of the prompt (template.text or "
                          "dataset.text_fields); the method must never read the labels. Take it out of the template")

    # empty inputs, then values that are not text (numbers, lists, structs, bytes of a JSON Lines or Parquet file:
    # they would reach the prompt as Python writes them) and examples longer alone than the model's context:
    # an error naming the rows, or left out (dataset.on_bad_row=skip), as a data set's are
    checked = inputs + ([image_field] if image_field else [])
    empty = [i for i, row in enumerate(rows) if any(is_empty(row.get(f)) for f in checked)]
    kept = leave_out(np.arange(len(rows)), empty, [where[i] for i in empty], ds.on_bad_row, path.name,
                     f"have an empty input ({', '.join(checked)})", "Fill them in or delete them")
    check = row_check() if row_check and not image_field else None
    unscorable = {int(i): problem for i in kept
                  if (problem := text_field_problem(rows[i], inputs) or (check(rows[i]) if check else None))}
    kept = leave_out(kept, list(unscorable), [f"{where[i]} ({problem})" for i, problem in unscorable.items()],
                     ds.on_bad_row, path.name, "cannot be scored", "Mend those rows in the file", limit=3)

    labels = file_labels([rows[i].get(label_field) for i in kept], names, [where[i] for i in kept], label_field,
                         path.name) if label_field else None
    transductive = ds.transductive
    if not transductive and labels is None:
        raise ConfigError("dataset.transductive=false splits the file into an unlabelled pool and a test set by its "
                          "labels; set dataset.label_field=<column>, or leave dataset.transductive=true")
    if transductive:  # one seeded subset of dataset.num_examples rows (all by default), in file order
        keep = capped_subset(len(kept), ds.num_examples, ds.sample_seed)
        chosen = {"train": keep, "test": keep}
    else:
        train_idx, test_idx = protocol_sample(labels, len(names), ds.num_examples or len(kept),
                                              ds.sample_seed)
        chosen = {"train": train_idx, "test": test_idx}
    positions = {split: kept[idx] for split, idx in chosen.items()}
    split_labels = {split: None if labels is None else labels[idx] for split, idx in chosen.items()}
    if len(positions["train"]) < len(names):
        raise ConfigError(f"{len(positions['train'])} example(s) to label but {len(names)} classes "
                          f"(labelset.names={names}): the demonstrations of a round show every class, so the file "
                          "needs at least as many rows as classes. Add rows, raise dataset.num_examples, or name fewer classes")
    if image_field:
        from .images import decode_image  # only image tasks need PIL

        images, decoded = [], {}
        for split in ("train", "test"):
            for i in positions[split].tolist():
                if i not in decoded:
                    value = rows[i][image_field]
                    if isinstance(value, str) and not Path(value).is_absolute():
                        value = str(path.parent / value)  # image paths are relative to the file's folder
                    decoded[i] = len(images)
                    images.append(decode_image(value, f"{where[i]} of {path.name} ({image_field})"))
        split_rows = {split: [{**{k: v for k, v in rows[i].items() if k != image_field}, "row": i,
                               "image": decoded[i]}
                              for i in positions[split].tolist()] for split in ("train", "test")}
    else:
        images = None
        split_rows = {split: [rows[i] for i in positions[split].tolist()] for split in ("train", "test")}
    if transductive:
        split_rows["test"] = split_rows["train"]  # one list: TaskData.transductive
    if transductive and labels is not None:
        split_labels["test"] = split_labels["train"]
    digest = None
    if images is not None:
        from .features import images_digest

        digest = images_digest(images, split_rows["train"], split_rows["test"])
    log.info("%s: %d of its %d rows, %s", path.name, len(positions["test"]) if transductive else
             len(positions["train"]) + len(positions["test"]), len(rows),
             "no label column: predict-only" if labels is None else f"labels from column {label_field!r}")
    return FileData(train=split_rows["train"], test=split_rows["test"], train_labels=split_labels["train"],
                    test_labels=split_labels["test"], images=images, images_digest=digest, path=str(path),
                    columns=[c for c in columns], rows_in_file=len(rows),
                    source_rows={split: p for split, p in positions.items()}, label_field=label_field,
                    file_rows={split: [rows[i] for i in p.tolist()] for split, p in positions.items()})


def leave_out(kept: np.ndarray, bad: list[int], locations: list[str], on_bad_row: str, file: str, what: str,
              fix: str, limit: int = 5) -> np.ndarray:
    """``kept`` without the rows ``bad`` (found at ``locations``, which ``what`` describes): an error naming
    them and ``fix``, or, with ``dataset.on_bad_row=skip``, left out with a warning."""
    if not bad:
        return kept
    if on_bad_row == "error":
        raise ConfigError(f"{file}: {len(bad)} row(s) {what}: {show(locations, limit)}. {fix}, or set "
                          "dataset.on_bad_row=skip to leave them out")
    log.warning("%s: %d row(s) that %s left out (dataset.on_bad_row=skip): %s", file, len(bad), what,
                show(locations, limit))
    return np.setdiff1d(kept, bad)


def file_labels(values: Sequence, names: Sequence[str], where: Sequence[str], column: str, file: str) -> np.ndarray:
    """Class ids of a label column's values: a label name of ``names`` or a class id ``0..K-1``."""
    position = {name: k for k, name in enumerate(names)}
    labels = []
    for value, place in zip(values, where):
        if is_empty(value):
            raise ConfigError(f"{file} {place} has no label in column {column!r}; fill it in, or leave "
                              "dataset.label_field unset for a predict-only run (no accuracy)")
        text = str(value).strip()
        if text in position:
            labels.append(position[text])
            continue
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None and number.is_integer() and 0 <= number < len(names):
            labels.append(int(number))
            continue
        raise ConfigError(f"{file} {place} has label {value!r} in column {column!r}: neither one of labelset.names "
                          f"{list(names)} nor a class id 0..{len(names) - 1}. Name every class of the column in "
                          "labelset.names (in the order of its ids)")
    return np.asarray(labels, dtype=np.int64)
