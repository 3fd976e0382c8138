"""The one place a run's prompt encoder is built: its template and label set, text or images
(:class:`~joint_inference.prompts.images.ImagePromptEncoder`, each example's image fragment at ``<image>``),
shared label tokens folded into the prompt where the label mode reads them so."""
from __future__ import annotations

from typing import Sequence

import torch

from ..core.settings import FOLDING_MODES
from .images import ImagePromptEncoder
from .templates import PromptEncoder, Template


def build_prompt_encoder(tokenizer, template: str, label_names: Sequence[str], label_mode: str,
                         images: tuple[Sequence[Sequence[int]], torch.Tensor] | None = None, model=None,
                         separator: str = "\n") -> PromptEncoder:
    """``images``: (fragments, features) of an image task's images, where ``model`` (a vision-language model's
    settings) says how the model ends an example (``chunk_end``) and what it writes between examples
    (``separator``); a text task's examples are joined by ``separator``."""
    template, names = Template(template), list(label_names)
    fold = label_mode in FOLDING_MODES
    if images is None:
        return PromptEncoder(tokenizer, template, names, fold_shared_label_tokens=fold, separator=separator)
    fragments, features = images
    return ImagePromptEncoder(tokenizer, template, names, fragments, features, chunk_end=model.chunk_end,
                              separator=model.separator, fold_shared_label_tokens=fold)
