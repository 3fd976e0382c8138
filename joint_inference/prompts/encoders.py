"""The one place a run's prompt encoder is built: the template and label set of the config, text or
images (:class:`~joint_inference.prompts.images.ImagePromptEncoder`, each example's image fragment at
``<image>``), shared label tokens folded into the prompt where the label mode reads them so."""
from __future__ import annotations

from typing import Sequence

import torch

from .images import ImagePromptEncoder
from .templates import PromptEncoder, Template
from ..scoring.scorer import FOLDING_MODES


def build_prompt_encoder(cfg, tokenizer, images: tuple[Sequence[Sequence[int]], torch.Tensor] | None = None
                         ) -> PromptEncoder:
    """``images``: (fragments, features) of an image task's images, where ``cfg.model`` says how the
    model ends an example (``chunk_end``) and what it writes between examples (``separator``)."""
    template, names = Template(cfg.template.text), list(cfg.labelset.names)
    fold = cfg.label_mode in FOLDING_MODES
    if images is None:
        return PromptEncoder(tokenizer, template, names, fold_shared_label_tokens=fold)
    fragments, features = images
    return ImagePromptEncoder(tokenizer, template, names, fragments, features, chunk_end=cfg.model.chunk_end,
                              separator=cfg.model.separator, fold_shared_label_tokens=fold)
