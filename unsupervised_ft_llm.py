"""Unsupervised fine-tuning of a language model (docs/protocol.md §4, paper Table 1, UFT column).

    python unsupervised_ft_llm.py                                      # Gemma-3-270M on SST-2
    python unsupervised_ft_llm.py dataset=sst2 model=llama3.1_8b       # a paper row
    python unsupervised_ft_llm.py estimator=naive estimator.baseline=false task_encoder=linear

Writes results.json, results.md (printed at the end), metrics.jsonl (every step), the adapter (peft
``save_pretrained``), learning_curve.png and checkpoint.pt to the run directory; starting again with
the same ``hydra.run.dir`` resumes. ``--help`` lists the keys and the config groups.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from joint_inference.runs.cli import launch, run_script
from joint_inference.runs.root import run_finetuning as run


@hydra.main(version_base="1.3", config_path="configs", config_name="unsupervised_ft_llm")
def main(cfg: DictConfig) -> None:
    run_script(run, cfg)


if __name__ == "__main__":
    launch(main)
