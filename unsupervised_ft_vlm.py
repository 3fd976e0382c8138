"""Unsupervised fine-tuning of a vision-language model (METHOD.md §4, paper Table 3).

    python unsupervised_ft_vlm.py dataset=cifar100 model=openflamingo_4b task_encoder=lora
    python unsupervised_ft_vlm.py dataset=cifar100 model=openflamingo_4b task_encoder=linear

The training loop, estimators and checkpoints are the text ones (joint_inference.uft). Writes
results.json, the adapter or linear head, learning_curve.png and checkpoint.pt; the same
``hydra.run.dir`` resumes.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from joint_inference.errors import exit_on_config_error
from joint_inference.uft import run_finetuning as run


@hydra.main(version_base="1.3", config_path="configs", config_name="unsupervised_ft_vlm")
def main(cfg: DictConfig) -> None:
    exit_on_config_error(run, cfg)


if __name__ == "__main__":
    main()
