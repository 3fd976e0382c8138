"""Unsupervised fine-tuning of a vision-language model (docs/protocol.md §4, paper Table 3).

    python unsupervised_ft_vlm.py dataset=cifar100 model=openflamingo_4b task_encoder=lora
    python unsupervised_ft_vlm.py dataset=cifar100 model=openflamingo_4b task_encoder=linear

The training loop, estimators and checkpoints are the text ones (joint_inference.methods.uft). Writes
results.json, results.md, metrics.jsonl, the adapter or linear head, learning_curve.png and
checkpoint.pt; the same ``hydra.run.dir`` resumes.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from joint_inference.runs.cli import launch, run_script
from joint_inference.runs.root import run_finetuning as run


@hydra.main(version_base="1.3", config_path="configs", config_name="unsupervised_ft_vlm")
def main(cfg: DictConfig) -> None:
    run_script(run, cfg)


if __name__ == "__main__":
    launch(main)
