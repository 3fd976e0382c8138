"""Unsupervised in-context learning with a language model (METHOD.md §5, paper Table 1).

    python unsupervised_icl_llm.py                                   # Gemma-3-270M on SST-2, CPU-friendly
    python unsupervised_icl_llm.py dataset=sst2 model=llama3.1_8b    # a paper row
    python unsupervised_icl_llm.py -m dataset=sst2,ag_news,trec seed=0,1,2
    python unsupervised_icl_llm.py dataset=mmlu model=llama3.1_8b    # all 57 MMLU subjects, one model load

Writes results.json, results.md (printed at the end) and rounds.png to the run directory; starting
again with the same ``hydra.run.dir`` resumes where it stopped (each finished split of a stage is kept).
``--help`` lists the keys and the config groups.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from joint_inference.cli import run_script
from joint_inference.errors import ConfigError
from joint_inference.generative import run_generation
from joint_inference.subjects import run_all_subjects, runs_all_subjects
from joint_inference.uicl import run_classification

RUNNERS = {"classification": run_classification, "generation": run_generation}


def run(cfg: DictConfig) -> dict:
    """Dispatch on the task's kind (and MMLU's ``subject=all``); every runner writes its results into
    ``cfg.output_dir``."""
    kind = cfg.dataset.get("kind", "classification")
    if kind not in RUNNERS:
        raise ConfigError(f"dataset kind {kind!r} is not supported; valid kinds: {', '.join(RUNNERS)}")
    if runs_all_subjects(cfg):
        return run_all_subjects(cfg)
    return RUNNERS[kind](cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="unsupervised_icl_llm")
def main(cfg: DictConfig) -> None:
    run_script(run, cfg)


if __name__ == "__main__":
    main()
