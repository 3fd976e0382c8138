"""Vision-language models: loading them, and the image embeddings their prompts read.

The rest of the project never sees an image. An image enters a prompt as a *fragment*: the
token ids the model's processor writes for one image (e.g. ``<image>`` repeated once per
visual token, with whatever markers the model puts around it), where every visual-token slot
holds a negative id ``-1 - r`` naming row ``r`` of a table of image embeddings. The table is
computed once per image (the vision tower and projector run once, not once per prompt) and
cached on disk; the :class:`~joint_inference.scoring.scorer.Scorer` swaps the rows in as input
embeddings. Any transformers VLM that merges image features into its language model's input
embeddings works this way (LLaVA, LLaVA-1.5, Idefics3/SmolVLM); OpenFlamingo, which reads images
through cross-attention, has its own backend in :mod:`joint_inference.models.openflamingo`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..core.errors import ConfigError
from ..data.features import cached_features
from ..data.hub import TaskData
from ..prompts.images import IMAGE_MARKER
from .language import resolve_dtype


def tiny_vlm(seed: int = 0, image_size: int = 32, patch_size: int = 8, vision: dict | None = None,
             text: dict | None = None):
    """(random LLaVA-style VLM, processor): a 2-layer CLIP-like vision tower and a 2-layer Llama,
    with a locally trained tokenizer. For smoke tests; no download. ``vision`` / ``text`` override
    the towers' config keys (benchmarks build realistic widths this way)."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from .tiny import train_tokenizer

    tokenizer = train_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        image_token=IMAGE_MARKER, num_additional_image_tokens=1)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(**{"image_size": image_size, "patch_size": patch_size, "hidden_size": 32,
                                 "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                 "initializer_range": 0.2, **(vision or {})})
    text = LlamaConfig(**{"vocab_size": len(tokenizer) + 7, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "max_position_embeddings": 4096, "initializer_range": 0.2, "tie_word_embeddings": False,
                          "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                          "pad_token_id": tokenizer.pad_token_id, **(text or {})})
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_MARKER))
    return LlavaForConditionalGeneration(config).eval(), processor


def load_vlm(spec, device: torch.device):
    """(VLM in eval mode with frozen weights, its processor) for the settings of a transformers VLM."""
    if spec.library != "transformers":
        raise ConfigError(f"model {spec.name!r} uses library {spec.library!r}; this loader serves transformers VLMs")
    if spec.random_init:
        model, processor = tiny_vlm(**spec.random_init)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(spec.pretrained, **(spec.processor_kwargs or {}))
            model = AutoModelForImageTextToText.from_pretrained(
                spec.pretrained, dtype=resolve_dtype(spec.dtype, device))
        except (OSError, ValueError) as err:
            raise ConfigError(f"could not load VLM {spec.pretrained!r}: {err}\nOffline or no access? Point "
                              "model.pretrained at a local directory, or smoke-test with model=tiny_random_vlm.") from None
    model.to(device=device, dtype=resolve_dtype(spec.dtype, device)).eval().requires_grad_(False)
    if image_token_id(model.config) is None:
        raise ConfigError(f"{type(model).__name__} has no image token in its config; the transformers backend "
                          "needs a VLM that merges image features into its input embeddings (LLaVA, Idefics3, SmolVLM)")
    return model, processor


def image_token_id(config) -> int | None:
    """The id standing for one visual token in a VLM's input (named differently across families)."""
    image_id = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if image_id is None else image_id


class _Captured(Exception):
    """Raised by a hook to stop a forward pass once the language model's input embeddings are known."""


@torch.inference_mode()
def image_fragments(model, processor, images: Sequence, batch_size: int = 32, progress: bool = True):
    """(fragments, features): per image, the processor's token ids with ``-1`` at each visual-token slot,
    and the (total slots, hidden) embeddings the model puts there, in order.

    The model's own forward pass computes them (vision tower, projector, merge), stopped by a hook
    at the entrance of the language model, so any VLM that merges features this way is served.
    """
    image_token = getattr(processor, "image_token", IMAGE_MARKER)
    image_id = image_token_id(model.config)
    body = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    tokenizer = processor.tokenizer
    lead = tokenizer("").input_ids  # special tokens the tokenizer adds around any text (BOS)
    captured = []

    def capture(module, args, kwargs):
        captured.append(kwargs["inputs_embeds"])
        raise _Captured

    fragments, features = [], []
    hook = body.get_decoder().register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="image features", disable=not progress):
            batch = list(images[start:start + batch_size])
            inputs = processor(text=[image_token] * len(batch), images=batch, return_tensors="pt", padding=True)
            inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            captured.clear()
            try:
                body(**inputs)
            except _Captured:
                pass
            embeds = captured[0]
            for row in range(len(batch)):
                ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
                ids = ids[len(lead):] if ids[:len(lead)] == lead else ids
                slots = torch.tensor([t == image_id for t in ids])
                if not slots.any():
                    raise ConfigError(f"the processor of {type(model).__name__} wrote no image tokens for an image")
                valid = embeds[row][inputs["attention_mask"][row].bool()]
                valid = valid[len(valid) - len(ids):]  # without the lead tokens
                features.append(valid[slots.to(valid.device)].float().cpu())
                fragments.append([-1 if t == image_id else t for t in ids])
    finally:
        hook.remove()
    return fragments, torch.cat(features)


def clip_embeddings(spec, images: Sequence, device: torch.device, batch_size: int = 64, progress: bool = True):
    """(images, dim) CLIP image embeddings, as the projection gives them (``spec``: a model's ``image_features``
    entry): the fixed features of the linear task encoder. Not L2-normalised: the original's head reads the raw
    embeddings (its ``emb_norm: false``), and its learning rate was chosen for their scale."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if spec.random_init:
        from transformers import CLIPImageProcessorPil

        dims = dict(spec.random_init)
        torch.manual_seed(dims.pop("seed", 0))
        size = dims.pop("image_size", 32)
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "projection_dim": 16, "patch_size": 8, **dims, "image_size": size}))
        processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(spec.pretrained)
            model = CLIPVisionModelWithProjection.from_pretrained(spec.pretrained)
        except (OSError, ValueError) as err:
            raise ConfigError(f"could not load CLIP {spec.pretrained!r}: {err}\nOffline? Point "
                              "model.image_features.pretrained at a local copy, or precompute the features "
                              "elsewhere with scripts/precompute_features.py and copy the cache.") from None
    model.to(device).eval()
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc="CLIP features", disable=not progress):
            pixels = processor(images=list(images[start:start + batch_size]), return_tensors="pt").pixel_values
            out.append(model(pixel_values=pixels.to(device)).image_embeds.float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------- prompts of a task
def load_image_model(spec, dataset, device: torch.device, data: TaskData, progress: bool = True):
    """(VLM, its tokenizer, (fragments, features) of the task's images) for the settings of a vision-language
    model; the image embeddings come from the feature cache."""
    if spec.library == "openflamingo":
        from .openflamingo import load_openflamingo

        return load_openflamingo(spec, dataset, device, data)
    model, processor = load_vlm(spec, device)
    fragments, features = vlm_image_features(spec, dataset, model, processor, data, progress)
    return model, processor.tokenizer, (fragments, features.to(device))


def vlm_image_features(spec, dataset, model, processor, data: TaskData, progress: bool = True):
    """The VLM's image fragments and embeddings of the task's images, from the cache or computed once."""
    settings = {"model": spec.pretrained or dict(spec.random_init), "dtype": str(model.dtype),
                "preprocessing": processor.image_processor.to_dict(), "images": data.images_digest}
    saved = cached_features("vlm", spec.name, dataset, settings, lambda: dict(zip(
        ("fragments", "features"), image_fragments(model, processor, data.images, progress=progress))))
    return saved["fragments"], saved["features"]


def clip_features(model, dataset, data: TaskData, device: torch.device, progress: bool = True
                  ) -> dict[str, torch.Tensor]:
    """{"train", "test"}: CLIP image embeddings of the task's images (``model.image_features`` computes them),
    from the cache or computed once."""
    spec = model.image_features
    settings = {"model": spec.pretrained or dict(spec.random_init), "normalised": False,
                "images": data.images_digest}
    saved = cached_features("clip", spec.name, dataset, settings,
                            lambda: {"features": clip_embeddings(spec, data.images, device, progress=progress)})
    features = saved["features"].to(device)
    return {split: features[[row["image"] for row in rows]]
            for split, rows in (("train", data.train), ("test", data.test))}
