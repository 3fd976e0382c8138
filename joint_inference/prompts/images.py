"""Image prompts: an example's image enters its prompt as a *fragment* of token ids.

A fragment is what the model's processor writes for one image (e.g. ``<image>`` repeated once per
visual token, with the markers the model puts around it), where every visual-token slot holds a
negative id ``-1 - r`` naming row ``r`` of a table of image embeddings
(:mod:`~joint_inference.models.vision` computes the table once per image); the
:class:`~joint_inference.scoring.scorer.Scorer` swaps the rows in as input embeddings.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..core.errors import ConfigError
from .templates import PromptEncoder, Template

IMAGE_MARKER = "<image>"          # where the image goes in a template (docs/protocol.md §7)
CHUNK_END_MARKER = "<|endofchunk|>"  # OpenFlamingo's end of an example; other models map it to their own text


class ImagePromptEncoder(PromptEncoder):
    """A :class:`PromptEncoder` whose examples carry an image: the template's ``<image>`` becomes
    the example's image fragment, ``<|endofchunk|>`` the model's own end-of-example text."""

    def __init__(self, tokenizer, template: Template, label_names: Sequence[str], fragments: Sequence[Sequence[int]],
                 features: torch.Tensor, chunk_end: str = "", separator: str = "\n", fold_shared_label_tokens=False):
        before, after = template.text.split("{y}")
        if IMAGE_MARKER not in before or IMAGE_MARKER in after:
            raise ConfigError(f"an image template needs {IMAGE_MARKER} before {{y}} (and none after it): "
                              f"{template.text!r}")
        super().__init__(tokenizer, Template(template.text.replace(CHUNK_END_MARKER, chunk_end)), label_names,
                         fold_shared_label_tokens, separator)
        self.image_features = features
        offsets = np.cumsum([0] + [sum(t == -1 for t in f) for f in fragments])
        self.fragments = []
        for fragment, offset in zip(fragments, offsets):
            slot = iter(range(offset, offset + len(fragment)))
            self.fragments.append(tuple(-1 - next(slot) if t == -1 else t for t in fragment))

    def prefix_ids(self, prefix: str, example: Mapping) -> tuple[int, ...]:
        """The text before the label with the example's image fragment at each ``<image>``."""
        pieces = prefix.split(IMAGE_MARKER)
        ids = list(super().prefix_ids(pieces[0], example)) if pieces[0] else []
        for text in pieces[1:]:
            ids.extend(self.fragments[example["image"]])
            ids.extend(super().prefix_ids(text, example) if text else ())
        return tuple(ids)
