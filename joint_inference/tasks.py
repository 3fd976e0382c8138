"""Loading a classification task, text or images: the only place that branches on the modality.

``load_data`` gives the protocol's sample (METHOD.md §7); ``load_prompts`` the model and the
examples encoded as token pieces, ready for the shared :class:`~joint_inference.scoring.Scorer`.
Everything downstream (rounds, estimators, training loop) is the same for both modalities.
"""
from __future__ import annotations

import torch

from .data import TaskData, check_label_set, load_task
from .errors import ConfigError
from .models import load_model
from .prompts import PromptEncoder, Template
from .scoring import FOLDING_MODES

MODALITIES = ("text", "image")


def modality(cfg) -> str:
    return cfg.dataset.get("modality", "text")


def load_data(cfg) -> TaskData:
    """The unlabelled pool and test set of ``cfg.dataset`` (images decoded for image tasks)."""
    check_label_set(cfg.labelset.names, cfg.dataset)
    if modality(cfg) == "image":
        from .vision import load_image_task

        return load_image_task(cfg.dataset, list(cfg.labelset.names))
    return load_task(cfg.dataset)


def load_prompts(cfg, device: torch.device, data: TaskData):
    """(model, prompt encoder, {"train", "test"}: encoded examples) for ``cfg.model`` and ``cfg.template``."""
    if modality(cfg) == "image":
        from .vision import load_image_prompts

        return load_image_prompts(cfg, device, data)
    model, tokenizer = load_model(cfg.model, device)
    return (model, *text_prompts(cfg, tokenizer, data))


def text_prompts(cfg, tokenizer, data: TaskData):
    """(prompt encoder, {"train", "test"}: encoded examples) of a text task."""
    encoder = PromptEncoder(tokenizer, Template(cfg.template.text), list(cfg.labelset.names),
                            fold_shared_label_tokens=cfg.label_mode in FOLDING_MODES)
    return encoder, encoder.encode_splits(data)


def load_vllm_scorer(cfg, data: TaskData):
    """(vLLM scorer, encoded examples) for ``backend=vllm``: the tokenizer alone is loaded here, the
    weights by vLLM. Text tasks, one process."""
    from .distributed import process_state
    from .models import load_tokenizer
    from .vllm_scoring import make_vllm_scorer

    if modality(cfg) != "text":
        raise ConfigError("backend=vllm scores text tasks; image tasks run with backend=hf")
    if process_state().num_processes > 1:
        raise ConfigError("backend=vllm runs in one process (it spreads the model over the visible GPUs with "
                          "tensor parallelism); start it with python, not accelerate launch")
    encoder, examples = text_prompts(cfg, load_tokenizer(cfg.model), data)
    return make_vllm_scorer(cfg.model, encoder, cfg.label_mode, seed=cfg.seed, show_progress=cfg.progress), examples
