"""Unsupervised in-context learning with a vision-language model (docs/protocol.md §5, paper Table 3).

    python unsupervised_icl_vlm.py dataset=cifar100 model=openflamingo_4b
    python unsupervised_icl_vlm.py model=tiny_random_vlm dataset=cifar10 dataset.num_examples=60 N=2 T=1 num_repeats=1 device=cpu

The rounds are the text ones (joint_inference.methods.uicl); only the prompts hold images. Writes
results.json, results.md and rounds.png to the run directory; the same ``hydra.run.dir`` resumes.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from joint_inference.runs.cli import launch, run_script
from joint_inference.runs.root import run_icl as run


@hydra.main(version_base="1.3", config_path="configs", config_name="unsupervised_icl_vlm")
def main(cfg: DictConfig) -> None:
    run_script(run, cfg)


if __name__ == "__main__":
    launch(main)
