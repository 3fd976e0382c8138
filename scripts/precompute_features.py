"""Compute the image features of a task once and cache them on disk (joint_inference.data.features).

    python scripts/precompute_features.py dataset=cifar100 model=openflamingo_4b
    python scripts/precompute_features.py dataset=cifar10 model=tiny_random_vlm dataset.num_examples=60 device=cpu

Takes the same overrides as unsupervised_icl_vlm.py / unsupervised_ft_vlm.py and fills the cache
those runs read: the VLM's image embeddings (what its prompts hold) and the CLIP image embeddings
of the linear task encoder. Runs with the same dataset sample then load them without recomputing.
"""
from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from joint_inference.models.vision import clip_features
from joint_inference.runs.cli import run_script
from joint_inference.runs.config import read_settings
from joint_inference.runs.root import Parts

log = logging.getLogger("precompute_features")


def run(cfg: DictConfig) -> None:
    settings = read_settings(cfg)
    parts = Parts(settings)
    data = parts.data()
    parts.model_and_encoder(data)  # the VLM's image embeddings: computed and cached when missing
    clip = clip_features(settings.model, settings.dataset, data, parts.device, settings.progress)
    log.info("%s: features of %d images cached (CLIP dim %d)", settings.dataset.name, len(data.images),
             clip["train"].shape[1])


@hydra.main(version_base="1.3", config_path="../configs", config_name="unsupervised_icl_vlm")
def main(cfg: DictConfig) -> None:
    run_script(run, cfg)


if __name__ == "__main__":
    main()
