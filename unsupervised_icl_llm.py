"""Unsupervised in-context learning with a language model (docs/protocol.md §5, paper Table 1).

    python unsupervised_icl_llm.py +experiment=quickstart            # Gemma-3-270M on SST-2, minutes on a CPU
    python unsupervised_icl_llm.py dataset=local dataset.path=reviews.csv labelset.names=[negative,positive] \
        template.text="{text}\nThe sentiment is {y}."               # your own file, no labels needed
    python unsupervised_icl_llm.py +experiment=quickstart dry_run=true   # prompts, tokens, wall time; runs nothing
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

from joint_inference.runs.cli import launch, run_script
from joint_inference.runs.root import run_icl as run


@hydra.main(version_base="1.3", config_path="configs", config_name="unsupervised_icl_llm")
def main(cfg: DictConfig) -> None:
    run_script(run, cfg)


if __name__ == "__main__":
    launch(main)
