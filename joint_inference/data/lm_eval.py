"""A multiple-choice task of lm-evaluation-harness, read through lm-eval's own ``TaskManager``.

Everything that defines the task comes from its YAML as lm-eval reads it: the documents (its evaluation split:
test, else validation), ``doc_to_text``, ``doc_to_choice``, ``doc_to_target``, ``target_delimiter`` and
``fewshot_delimiter``. A document becomes a row ``{"lm_eval_text": doc_to_text(doc), "lm_eval_choices": doc_to_choice(doc)}``
labelled ``doc_to_target(doc)``, the template is ``{lm_eval_text}<target_delimiter>{y}``, each label is its
choice's text tokenized after the document's context as lm-eval tokenizes it, and examples in a prompt
are joined by ``fewshot_delimiter``, so a zero-shot prompt is exactly the context lm-eval scores and a label is
exactly its continuation. The documents are both the unlabelled pool and the queries (transductive, as lm-eval
evaluates them); the supervised baseline's demonstrations come from the task's few-shot documents.

Choices may differ from document to document (HellaSwag, PIQA): each example then carries its own label
texts (:class:`~joint_inference.prompts.templates.ChoiceEncoder`), and the K labels are the choices' positions;
the documents must all have K choices. Generation tasks are refused.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError
from .hub import TaskData, capped_subset

TEXT_FIELD = "lm_eval_text"
CHOICES_FIELD = "lm_eval_choices"
INSTALL = "pip install 'joint-inference[lmeval]' (lm-eval 0.4.x)"


@dataclass
class LMEvalTask:
    name: str
    task: object  # lm-eval's ConfigurableTask
    docs: list[dict]  # the evaluation documents, in lm-eval's order
    doc_choices: list[list[str]]  # each document's doc_to_choice
    choices: list[str]  # the label set: the choices where every document has the same, else "choice 1".."choice K"
    targets: np.ndarray
    target_delimiter: str
    fewshot_delimiter: str
    version: object

    @property
    def template(self) -> str:
        return "{" + TEXT_FIELD + "}" + self.target_delimiter.replace("{", "{{").replace("}", "}}") + "{y}"

    def rows(self, docs, choices) -> list[dict]:
        """The rows of ``docs`` whose choices are ``choices``: their context and their choices."""
        return [{TEXT_FIELD: self.task.doc_to_text(doc), CHOICES_FIELD: c} for doc, c in zip(docs, choices)]


@dataclass
class LMEvalData(TaskData):
    """:class:`TaskData` of an lm-eval task, with the task and the documents' ids (positions among its
    evaluation documents) for the lm-eval-shaped outputs."""

    task: LMEvalTask | None = None
    doc_ids: list[int] = field(default_factory=list)


_LOADED: dict[tuple, LMEvalTask] = {}


def load_lm_eval_task(name: str | None, include_path: str | None) -> LMEvalTask:
    """The task ``name`` (from lm-eval's own tasks, or the YAML files under ``include_path``), loaded once per
    process. Every refusal is a ConfigError that says what to do."""
    if not name:
        raise ConfigError("dataset=lm_eval needs the task: dataset.task=<name> (an lm-eval task, or one in "
                          "dataset.include_path=<folder of task YAML>)")
    key = (name, include_path)
    if key in _LOADED:
        return _LOADED[key]
    try:
        from lm_eval.tasks import TaskManager
    except ModuleNotFoundError:
        raise ConfigError(f"dataset=lm_eval needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    if include_path is not None:
        check_yaml_files(include_path)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # one line per metric default would bury the run's log
    # the user's folder alone first: indexing lm-eval's ~15,000 own tasks takes seconds
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or name not in manager.all_tasks:
        manager = TaskManager(include_path=include_path)
    if name not in manager.all_tasks:
        where = f" or in {include_path}" if include_path else " (dataset.include_path=<folder> adds your own YAML)"
        raise ConfigError(f"unknown lm-eval task {name!r}: it is not among lm-eval's {len(manager.all_tasks):,} tasks"
                          f"{where}; `lm-eval ls tasks` lists them")
    try:
        loaded = manager.load([name])
    except Exception as err:  # noqa: BLE001 (lm-eval's own errors: a YAML naming a missing field, unloadable data)
        raise ConfigError(f"lm-eval could not load task {name!r}: {type(err).__name__}: {err}") from None
    tasks = loaded["tasks"] if isinstance(loaded, dict) and "tasks" in loaded else loaded
    if len(tasks) != 1:
        raise ConfigError(f"lm-eval task {name!r} is a group of {len(tasks)} tasks ({', '.join(list(tasks)[:5])}...); "
                          "run them one at a time: dataset.task=<one of them> (Hydra's -m sweeps them)")
    task = next(iter(tasks.values()))
    if task.OUTPUT_TYPE != "multiple_choice":
        raise ConfigError(f"lm-eval task {name!r} has output_type {task.OUTPUT_TYPE!r}; dataset=lm_eval runs "
                          "multiple_choice tasks (generation tasks run with dataset=gsm8k-style configs, "
                          "docs/generation.md)")
    docs = list(task.eval_docs)
    if not docs:
        raise ConfigError(f"lm-eval task {name!r} has no evaluation documents (test or validation split)")
    choices = doc_choices(task, docs)
    counts = sorted({len(c) for c in choices})
    if len(counts) > 1:
        raise ConfigError(f"lm-eval task {name!r} has documents with {' or '.join(map(str, counts))} choices; "
                          "joint inference labels examples with one number of labels K, so the task's documents "
                          "must all have as many choices")
    targets = np.array([target_index(task.doc_to_target(doc), c, name) for doc, c in zip(docs, choices)])
    same = all(c == choices[0] for c in choices)
    config = task.config
    result = LMEvalTask(name=name, task=task, docs=docs, doc_choices=choices, targets=targets,
                        choices=choices[0] if same else [f"choice {k + 1}" for k in range(counts[0])],
                        target_delimiter=config.target_delimiter if config.target_delimiter is not None else " ",
                        fewshot_delimiter=config.fewshot_delimiter if config.fewshot_delimiter is not None else "\n\n",
                        version=task.VERSION if hasattr(task, "VERSION") else None)
    _LOADED[key] = result
    return result


def check_yaml_files(include_path: str) -> None:
    """Each task YAML under ``include_path`` parses (lm-eval skips one that does not, and the task would then be
    'unknown')."""
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval's tags (!function utils.process_docs) read as plain values
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    root = Path(include_path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"dataset.include_path={include_path!r} is not a folder; give the folder that holds the "
                          "task YAML files")
    for path in sorted(root.rglob("*.yaml")):
        try:
            yaml.load(path.read_text(), Loader=Loader)
        except yaml.YAMLError as err:
            raise ConfigError(f"the task YAML {path} does not parse ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); fix it or move it out of "
                              "dataset.include_path") from None


def doc_choices(task, docs) -> list[list[str]]:
    """Each document's ``doc_to_choice``, as text."""
    return [[str(c) for c in task.doc_to_choice(doc)] for doc in docs]


def target_index(target, choices: list[str], name: str) -> int:
    """``doc_to_target`` as a choice index (it may give the index or the choice's text)."""
    if isinstance(target, (int, np.integer)) and 0 <= int(target) < len(choices):
        return int(target)
    if isinstance(target, str) and target in choices:
        return choices.index(target)
    if isinstance(target, str) and target.strip().isdigit() and 0 <= int(target) < len(choices):
        return int(target)
    raise ConfigError(f"lm-eval task {name!r}: doc_to_target gave {target!r}, neither an index nor one of the "
                      f"choices {choices}")


def lm_eval_data(task: LMEvalTask, num_examples: int | None, seed: int) -> LMEvalData:
    """The documents as both pool and queries (lm-eval's first ``num_examples``, as its ``--limit``), and the
    task's few-shot documents as the supervised baseline's demonstrations."""
    keep = np.arange(len(task.docs)) if num_examples is None else np.arange(min(num_examples, len(task.docs)))
    rows = task.rows([task.docs[i] for i in keep], [task.doc_choices[i] for i in keep])
    labels = task.targets[keep]
    try:  # the task's few-shot documents: its fewshot_split, else training, else validation (lm-eval's rule)
        shots = list(task.task.fewshot_docs() or [])
    except Exception:  # noqa: BLE001 (lm-eval raises several kinds where a task has none)
        shots = []
    shot_choices = doc_choices(task.task, shots)
    usable = [i for i, c in enumerate(shot_choices) if len(c) == len(task.choices)]  # K choices, as the documents
    usable = [usable[i] for i in capped_subset(len(usable), 1000, seed)]
    shots, shot_choices = [shots[i] for i in usable], [shot_choices[i] for i in usable]
    pool = task.rows(shots, shot_choices) if shots else None
    pool_labels = (np.array([target_index(task.task.doc_to_target(d), c, task.name) for d, c in zip(shots, shot_choices)])
                   if shots else None)
    return LMEvalData(train=rows, test=rows, train_labels=labels, test_labels=labels, supervised_pool=pool,
                      supervised_labels=pool_labels, task=task, doc_ids=[int(i) for i in keep])
