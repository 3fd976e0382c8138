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
from typing import Callable

import numpy as np

from ..core.settings import ICLSettings
from ..data.hub import TaskData
from ..reporting.results import interval, pct, stage_accuracies, stage_name, write_results
from ..scoring.scorer import LabelScorer
from .uicl import run_classification

log = logging.getLogger(__name__)


def run_all_subjects(run: ICLSettings, subjects: list[tuple[str, ICLSettings]],
                     load_data: Callable[[ICLSettings], TaskData], scorer: LabelScorer) -> dict:
    """Each subject's run (its settings write into ``<run dir>/subjects/<subject>``) in turn with one
    ``scorer``: its prompt encoder depends on the template and label set only (the subject is a row field);
    the summary in ``run.output_dir``."""
    per_subject = {}
    for i, (subject, settings) in enumerate(subjects, 1):
        log.info("subject %d/%d: %s", i, len(subjects), subject)
        per_subject[subject] = run_classification(settings, load_data(settings), scorer)
    results = summarize(run, per_subject)
    write_results(run.output_dir, results, subjects_table, macro_rounds_figure)
    log.info("macro average over %d subjects: %s", len(subjects),
             ", ".join(f"{stage_name(s)} {a:.4f}" for s, a in results["macro"].items()))
    return results


def summarize(run: ICLSettings, per_subject: dict[str, dict]) -> dict:
    """Each subject's stage accuracies, their mean over subjects (macro) and over questions (micro)."""
    accuracies = {subject: stage_accuracies(r) for subject, r in per_subject.items()}
    sizes = [r["num_test"] for r in per_subject.values()]
    stages = list(next(iter(accuracies.values())))

    def average(stage, weights=None):
        return float(np.average([a[stage] for a in accuracies.values()], weights=weights))

    return {
        "task": run.dataset.name, "model": run.model.name, "num_subjects": len(per_subject), "num_test": sum(sizes),
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
