"""MMLU as the original ran it (docs/protocol.md §8): every subject in one command, the model loaded once.

Each subject is an ordinary classification run (:func:`~joint_inference.methods.uicl.run_classification`,
transductive by default) in ``<run dir>/subjects/<subject>`` with its own saved stages, so an
interrupted run resumes at the subject and stage where it stopped and finished subjects are only
read back. The run directory's results.json holds each subject's test accuracies and their macro
(mean over subjects, what the paper reports) and micro (over all questions) averages.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..data.hub import ALL_SUBJECTS
from ..runs.planning import classification_plan, dry_run_tokenizer, format_plan, plan_summary, prompt_encoder
from ..core.errors import ConfigError
from ..reporting.results import interval, pct, stage_accuracies, stage_name, write_results
from ..data.tasks import load_data
from .uicl import load_scorer, run_classification
from ..core.utils import resolve_device

log = logging.getLogger(__name__)


def runs_all_subjects(cfg: DictConfig) -> bool:
    """``dataset.subject=all``: a run over every subject of ``dataset.subjects``."""
    return "subject" in cfg.dataset and cfg.dataset.subject == ALL_SUBJECTS


def subject_config(cfg: DictConfig, subject: str) -> DictConfig:
    """``cfg`` for one subject, writing into ``<run dir>/subjects/<subject>``."""
    return OmegaConf.merge(cfg, {"dataset": {"subject": subject},
                                 "output_dir": str(Path(cfg.output_dir) / "subjects" / subject)})


def run_all_subjects(cfg: DictConfig) -> dict:
    """Every subject of ``cfg.dataset.subjects`` in turn with one scorer; the summary in ``cfg.output_dir``."""
    subjects = list(cfg.dataset.subjects)
    if not subjects:
        raise ConfigError(f"dataset.subjects of {cfg.dataset.name!r} is empty; name the subjects to run")
    configs = [subject_config(cfg, subject) for subject in subjects]
    # the scorer's prompt encoder depends on the template and label set only (the subject is a row
    # field), so the scorer built with the first subject serves them all
    scorer, _ = load_scorer(configs[0], load_data(configs[0]), resolve_device(cfg.device))
    per_subject = {}
    for i, (subject, subject_cfg) in enumerate(zip(subjects, configs), 1):
        log.info("subject %d/%d: %s", i, len(subjects), subject)
        per_subject[subject] = run_classification(subject_cfg, scorer)
    results = summarize(cfg, per_subject)
    write_results(cfg.output_dir, results, subjects_table, macro_rounds_figure)
    log.info("macro average over %d subjects: %s", len(subjects),
             ", ".join(f"{stage_name(s)} {a:.4f}" for s, a in results["macro"].items()))
    return results


def summarize(cfg: DictConfig, per_subject: dict[str, dict]) -> dict:
    """Each subject's stage accuracies, their mean over subjects (macro) and over questions (micro)."""
    accuracies = {subject: stage_accuracies(r) for subject, r in per_subject.items()}
    sizes = [r["num_test"] for r in per_subject.values()]
    stages = list(next(iter(accuracies.values())))

    def average(stage, weights=None):
        return float(np.average([a[stage] for a in accuracies.values()], weights=weights))

    return {
        "task": cfg.dataset.name, "model": cfg.model.name, "num_subjects": len(per_subject), "num_test": sum(sizes),
        "macro": {stage: average(stage) for stage in stages},
        "micro": {stage: average(stage, sizes) for stage in stages},
        "subjects": {subject: {"num_test": r["num_test"], **accuracies[subject]} for subject, r in per_subject.items()},
        "timing": {key: sum(r["timing"][key] for r in per_subject.values()) for key in ("seconds", "prompts_scored")},
        "settings": next(iter(per_subject.values()))["settings"],  # the same for every subject
    }


def subjects_table(results: dict) -> str:
    """results.md: test accuracy per stage, averaged and per subject, with 95% intervals and what they mean."""
    stages = list(results["macro"])
    lines = [f"# {results['task']} / {results['model']}: {results['num_subjects']} subjects, "
             f"{results['num_test']} questions", "",
             "| subject | questions | " + " | ".join(map(stage_name, stages)) + " |", "| --- " * (len(stages) + 2) + "|"]

    def row(name, size, accuracies, with_interval=True):
        cells = [f"{pct(accuracies[s])} ({interval(accuracies[s], size)})" if with_interval else pct(accuracies[s])
                 for s in stages]
        lines.append(f"| {name} | {size} | " + " | ".join(cells) + " |")

    row("mean over subjects (macro)", results["num_test"], results["macro"], with_interval=False)
    row("over all questions (micro)", results["num_test"], results["micro"])
    for subject, r in results["subjects"].items():
        row(subject, r["num_test"], r)
    t = results["timing"]
    votes = results["settings"]["num_repeats"]
    lines += ["", f"{t['prompts_scored']} prompts scored in {t['seconds']:.1f} s.", "",
              f"* Each cell is a test accuracy: the fraction of the row's questions whose majority vote over {votes} "
              "votes (one prompt each; zero-shot: one prompt) is right, with its Wilson score 95% interval as a "
              "binomial proportion over the row's questions in brackets.",
              "* **macro**: the mean of the subjects' accuracies, each subject weighing alike (what the paper "
              "reports); an average of proportions over subjects of different sizes, so no binomial interval.",
              "* **micro**: the accuracy over all questions pooled.",
              "* Each subject's own results.md (subjects/<subject>/) adds the spread over votes."]
    return "\n".join(lines) + "\n"


def macro_rounds_figure(results: dict, out_dir: Path) -> None:
    """rounds.png of the mean over subjects (each subject's directory has its own)."""
    from ..reporting.plots import plot_rounds

    title = f"{results['task']} / {results['model']}: mean over {results['num_subjects']} subjects"
    plot_rounds(results["macro"], title, out_dir / "rounds.png")


def dry_run_subjects(cfg) -> dict:
    """``dry_run=true`` over every subject of an all-subjects run (MMLU): each subject's counts summed."""
    device = resolve_device(cfg.device)
    encoder = prompt_encoder(cfg, dry_run_tokenizer(cfg.model))
    totals: dict[str, dict] = {}
    for subject in cfg.dataset.subjects:
        for stage in classification_plan(cfg, load_data(subject_config(cfg, subject)), encoder):
            into = totals.setdefault(stage["stage"], {"stage": stage["stage"], "prompts": 0, "tokens": 0})
            into["prompts"] += stage["prompts"]
            into["tokens"] += stage["tokens"]
    plan = plan_summary(cfg, list(totals.values()), device)
    print(format_plan(f"dry run of {cfg.dataset.name} ({len(cfg.dataset.subjects)} subjects) / {cfg.model.name} on "
                      f"{device}: N={cfg.N}, T={cfg.T}, {cfg.num_repeats} votes. Nothing was scored or written.", plan),
          flush=True)
    return {"dry_run": plan}
