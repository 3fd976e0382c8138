"""OpenFlamingo (paper Table 3) through the ``open_flamingo`` package, imported here only and lazily.

OpenFlamingo reads images through gated cross-attention, not through its input embeddings. A
prompt names image ``k`` with the negative id ``-1 - k`` where the ``<image>`` token goes;
:class:`FlamingoBody` turns it back into ``<image>``, gathers the cached CLIP ViT-L/14 patch
tokens of the row's images, runs the perceiver, conditions the cross-attention layers and runs
the language model's transformer. The scorer then reads the hidden states like any causal LM's.
The CLIP tokens are computed once per image with open_clip and cached (features.py), so runs
build the vision tower without its weights and drop it.

Install (open_flamingo 2.0.1 pins torch 2.0.1; it works with newer torch and transformers):
    pip install open_clip_torch==3.3.0 einops einops-exts && pip install --no-deps open_flamingo==2.0.1
Both need torchvision (GPU machines; never install it on a CPU-only machine of this project).
"""
from __future__ import annotations

import importlib

import torch

from ..core.errors import ConfigError
from ..data.features import cached_features

INSTALL = ("pip install open_clip_torch==3.3.0 einops einops-exts && pip install --no-deps open_flamingo==2.0.1 "
           "(docs/vision.md: OpenFlamingo)")


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"model=openflamingo_* needs the {name} package ({err}). Install it: {INSTALL}") from None


class FlamingoBody(torch.nn.Module):
    """The language model of OpenFlamingo conditioned on the cached image features of each row."""

    def __init__(self, flamingo, image_tokens: torch.Tensor):
        super().__init__()
        self.flamingo = flamingo
        self.image_tokens = image_tokens  # (images, patches, dim) CLIP tokens, on the model's device
        lang = flamingo.lang_encoder
        self.transformer = getattr(lang, lang.base_model_prefix)

    def get_input_embeddings(self):
        return self.transformer.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=False, **kwargs):
        if cache is not None:
            raise ConfigError("OpenFlamingo prompts cannot continue a cached prefix (cross-attention needs "
                              "every image of the row); use support_sampling=per_query")
        media = input_ids < 0
        keys = [(-1 - row[m]).tolist() for row, m in zip(input_ids, media)]
        most = max(1, max(map(len, keys)))
        vision = self.image_tokens.new_zeros(len(keys), most, 1, *self.image_tokens.shape[1:])
        for row, k in enumerate(keys):
            if k:
                vision[row, : len(k), 0] = self.image_tokens[k]
        latents = self.flamingo.perceiver(vision.to(self.flamingo.perceiver.latents.dtype))
        lang_ids = torch.where(media, torch.full_like(input_ids, self.flamingo.media_token_id), input_ids)
        for layer in self.flamingo.lang_encoder._get_decoder_layers():
            layer.condition_vis_x(latents)
            layer.condition_media_locations(lang_ids == self.flamingo.media_token_id)
            layer.condition_use_cached_media(False)
        try:
            return self.transformer(input_ids=lang_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        finally:
            self.flamingo.lang_encoder.clear_conditioned_layers()


class OpenFlamingoForScoring(torch.nn.Module):
    """What the :class:`~joint_inference.scoring.scorer.Scorer` and peft need: a body, an output layer, a config."""

    base_model_prefix = "body"
    supports_prefix_caching = False

    def __init__(self, flamingo, image_tokens: torch.Tensor):
        super().__init__()
        self.body = FlamingoBody(flamingo, image_tokens)
        self.config = flamingo.lang_encoder.config

    def get_output_embeddings(self):
        return self.body.flamingo.lang_encoder.get_output_embeddings()

    @property
    def dtype(self) -> torch.dtype:
        return self.get_output_embeddings().weight.dtype


def clip_patch_tokens(spec, images, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """(images, patches, dim) CLIP tokens as OpenFlamingo's vision encoder gives them, in fp16."""
    open_clip = _import("open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(spec.clip_vision_encoder_path,
                                                                 pretrained=spec.clip_vision_encoder_pretrained)
    visual = model.visual.to(device).eval()
    visual.output_tokens = True
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([preprocess(im) for im in images[start:start + batch_size]]).to(device)
            out.append(visual(pixels)[1].half().cpu())
    return torch.cat(out)


def load_openflamingo(spec, dataset, device: torch.device, data):
    """(OpenFlamingo wrapped for scoring, its tokenizer, (fragments, features) of the task's images: one
    marker each, the CLIP tokens being the model's own)."""
    from .language import resolve_dtype

    settings = {"clip": [spec.clip_vision_encoder_path, spec.clip_vision_encoder_pretrained], "tokens": "patch, fp16",
                "images": data.images_digest}
    tokens = cached_features("openflamingo_clip", spec.clip_vision_encoder_path, dataset, settings,
                             lambda: {"features": clip_patch_tokens(spec, data.images, device)})["features"]
    factory = _import("open_flamingo")
    flamingo, _, tokenizer = factory.create_model_and_transforms(
        clip_vision_encoder_path=spec.clip_vision_encoder_path, clip_vision_encoder_pretrained=None,  # cached features
        lang_encoder_path=spec.lang_encoder_path, tokenizer_path=spec.tokenizer_path,
        cross_attn_every_n_layers=spec.cross_attn_every_n_layers)
    flamingo.vision_encoder = None  # never run: the CLIP tokens come from the cache
    hub = _import("huggingface_hub")
    weights = torch.load(hub.hf_hub_download(spec.checkpoint, "checkpoint.pt"), map_location="cpu", weights_only=True)
    flamingo.load_state_dict(weights, strict=False)
    dtype = resolve_dtype(spec.dtype, device)
    model = OpenFlamingoForScoring(flamingo, tokens.to(device=device, dtype=dtype)).to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, tokenizer, ([[-1]] * len(data.images), None)
