"""Loading a classification task, text or images: the only place that branches on the modality.

``load_data`` gives the protocol's sample (docs/protocol.md §7) of a data set, a file of the user's or an
image data set; everything downstream (rounds, estimators, training loop) is the same for both modalities.
"""
from __future__ import annotations

import string
from typing import Callable, Sequence

from ..core.settings import LMEvalSettings, LocalDataSettings
from ..prompts.templates import LABEL_FIELD, PromptEncoder, Template
from .files import load_file_task
from .hub import RowCheck, TaskData, check_label_set, load_task, text_field_problem
from .lm_eval import lm_eval_data, load_lm_eval_task

MODALITIES = ("text", "image")
TOKEN_SLACK = 8  # tokens a tokenizer may add to an example's bytes (a prefix space, a byte-fallback piece)


def modality(dataset) -> str:
    if isinstance(dataset, LocalDataSettings) and dataset.image_field:  # dataset=local with an image column
        return "image"
    return dataset.modality


def load_data(dataset, label_names: Sequence[str] | None, template: str | None,
              row_check: Callable[[], RowCheck] | None = None) -> TaskData:
    """The unlabelled pool and test set of ``dataset`` (images decoded for image tasks); the template and the
    label set are checked first, then a text task's rows by the check that ``row_check()`` builds (it may
    read the model's config and tokenizer: :func:`row_check`)."""
    if isinstance(dataset, LocalDataSettings):  # dataset=local: the user's own file, labelled or not (files.py)
        return load_file_task(dataset, label_names, template, row_check)
    if isinstance(dataset, LMEvalSettings):  # an lm-evaluation-harness task, read by lm-eval (lm_eval.py)
        return lm_eval_data(load_lm_eval_task(dataset.task, dataset.include_path), dataset.num_examples,
                            dataset.sample_seed)
    Template(template)
    check_label_set(label_names, dataset)
    if modality(dataset) == "image":
        from .images import load_image_task

        return load_image_task(dataset, list(label_names))
    return load_task(dataset, row_check() if row_check else None)


def row_check(template: str, encoder: PromptEncoder | None, context: int | None) -> Callable[[dict], str | None]:
    """What keeps a text row from being scored: a template field that is not text, or (with the run's prompt
    ``encoder`` and the model's ``context`` length, where the model says how long that is) an example that
    alone is longer than the context.

    Only an example whose bytes could reach the context is tokenized (a token covers at least a byte), so
    that checking the millions of rows of a hub dataset costs little.
    """
    fields = [field for _, field, _, _ in string.Formatter().parse(template) if field and field != LABEL_FIELD]
    parts = Template(template)
    encoder = encoder if context else None

    def check(row: dict) -> str | None:
        problem = text_field_problem(row, fields)  # choices[0], not choices: the value the template writes
        if problem or encoder is None:
            return problem
        added = len(encoder.bos) + len(encoder.label_stem) + TOKEN_SLACK
        if len(parts.render_parts(row)[0].encode()) + added <= context:
            return None
        length = len(encoder.bos) + len(encoder.encode(row).prefix)
        return f"alone it is {length} tokens, more than the model's context of {context}" if length > context else None

    return check
