"""Loading a classification task, text or images: the only place that branches on the modality.

``load_data`` gives the protocol's sample (docs/protocol.md §7); ``load_prompts`` the model and the
examples encoded as token pieces, ready for the shared :class:`~joint_inference.scoring.scorer.Scorer`.
Everything downstream (rounds, estimators, training loop) is the same for both modalities.
"""
from __future__ import annotations

import string
from typing import Callable

import torch

from .hub import TaskData, check_label_set, load_task, text_field_problem
from ..prompts.encoders import build_prompt_encoder
from ..core.errors import ConfigError
from ..models.language import context_length, load_model, load_tokenizer
from .files import is_file_task, load_file_task
from ..prompts.templates import LABEL_FIELD, Template

MODALITIES = ("text", "image")
TOKEN_SLACK = 8  # tokens a tokenizer may add to an example's bytes (a prefix space, a byte-fallback piece)


def modality(cfg) -> str:
    if is_file_task(cfg.dataset) and cfg.dataset.image_field:  # dataset=local with an image column
        return "image"
    return cfg.dataset.modality


def load_data(cfg) -> TaskData:
    """The unlabelled pool and test set of ``cfg.dataset`` (images decoded for image tasks); the template
    and the label set are checked first, and a text task's rows by :func:`row_check`."""
    if is_file_task(cfg.dataset):  # dataset=local: the user's own file, labelled or not (own_data.py)
        return load_file_task(cfg)
    template = Template(cfg.template.text)
    check_label_set(cfg.labelset.names, cfg.dataset)
    if modality(cfg) == "image":
        from .images import load_image_task

        return load_image_task(cfg.dataset, list(cfg.labelset.names))
    return load_task(cfg.dataset, row_check(cfg, template))


def row_check(cfg, template: Template) -> Callable[[dict], str | None]:
    """What keeps a text row from being scored: a template field that is not text, or an example that alone
    is longer than the model's context (where the model's config says how long that is).

    Only an example whose bytes could reach the context is tokenized (a token covers at least a byte), so
    that checking the millions of rows of a hub dataset costs little.
    """
    fields = [field for _, field, _, _ in string.Formatter().parse(template.text) if field and field != LABEL_FIELD]
    hf_model = cfg.backend in ("hf", "vllm") and not cfg.model.random_init
    context = context_length(cfg.model) if hf_model else None
    encoder = build_prompt_encoder(cfg, load_tokenizer(cfg.model)) if context else None

    def check(row: dict) -> str | None:
        problem = text_field_problem(row, fields)  # choices[0], not choices: the value the template writes
        if problem or encoder is None:
            return problem
        added = len(encoder.bos) + len(encoder.label_stem) + TOKEN_SLACK
        if len(template.render_parts(row)[0].encode()) + added <= context:
            return None
        length = len(encoder.bos) + len(encoder.encode(row).prefix)
        return f"alone it is {length} tokens, more than the model's context of {context}" if length > context else None

    return check


def load_prompts(cfg, device: torch.device, data: TaskData):
    """(model, prompt encoder, {"train", "test"}: encoded examples) for ``cfg.model`` and ``cfg.template``."""
    if modality(cfg) == "image":
        from ..models.vision import load_image_prompts

        return load_image_prompts(cfg, device, data)
    model, tokenizer = load_model(cfg.model, device)
    return (model, *text_prompts(cfg, tokenizer, data))


def text_prompts(cfg, tokenizer, data: TaskData):
    """(prompt encoder, {"train", "test"}: encoded examples) of a text task."""
    encoder = build_prompt_encoder(cfg, tokenizer)
    return encoder, encoder.encode_splits(data)


def load_vllm_scorer(cfg, data: TaskData):
    """(vLLM scorer, encoded examples) for ``backend=vllm``: the tokenizer alone is loaded here, the
    weights by vLLM. Text tasks, one process."""
    from ..core.distributed import process_state
    from ..models.language import load_tokenizer
    from ..scoring.vllm import make_vllm_scorer

    if modality(cfg) != "text":
        raise ConfigError("backend=vllm scores text tasks; image tasks run with backend=hf")
    if process_state().num_processes > 1:
        raise ConfigError("backend=vllm runs in one process (it spreads the model over the visible GPUs with "
                          "tensor parallelism); start it with python, not accelerate launch")
    encoder, examples = text_prompts(cfg, load_tokenizer(cfg.model), data)
    return make_vllm_scorer(cfg.model, encoder, cfg.label_mode, seed=cfg.seed, show_progress=cfg.progress), examples
