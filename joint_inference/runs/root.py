"""What a run of an in-context learning script does, by the task's kind (the one place that branches on
it): classification (text or images; MMLU's all-subjects runs), generation (GSM8K, MMLU-Pro) and MMMU
through an API; ``dry_run=true`` counts the work instead.
"""
from __future__ import annotations

from omegaconf import DictConfig

from .api_dry_run import dry_run as api_dry_run
from ..methods.mmmu import run_mmmu
from ..core.errors import ConfigError
from ..methods.subjects import dry_run_subjects, run_all_subjects, runs_all_subjects
from ..methods.uicl import run_classification
from ..methods.generation import run_generation

RUNNERS = {"classification": run_classification, "generation": run_generation, "mmmu": run_mmmu}


def run_icl(cfg: DictConfig) -> dict:
    """Dispatch on the task's kind (and MMLU's ``subject=all``); every runner writes its results into
    ``cfg.output_dir``."""
    kind = cfg.dataset.kind
    if cfg.dry_run and cfg.backend == "openai":  # requests, tokens and cost of a model behind an API
        return api_dry_run(cfg, run_icl)
    if cfg.dry_run and kind != "classification":
        raise ConfigError("dry_run=true counts the prompts of classification tasks; generation tasks (responses of "
                          "unknown length) have no dry run yet")
    if kind == "classification" and runs_all_subjects(cfg):  # MMMU runs its subjects itself
        return dry_run_subjects(cfg) if cfg.dry_run else run_all_subjects(cfg)
    return RUNNERS[kind](cfg)
