"""Run state that survives interruption, and the results files of a run directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

from ..core.distributed import is_main_process
from ..core.errors import ConfigError
from ..core.utils import atomic_write_json, atomic_write_text, differing_keys, read_json, wilson_interval

log = logging.getLogger(__name__)
STAGE_NAMES = {"zero_shot": "zero-shot", "supervised_icl": "supervised ICL",  # others: round_<t>
               "control_random_labels": "control: random labels",
               "control_batch_calibrated": "control: batch-calibrated",
               "control_majority_vote": "control: majority vote"}
STATE_KEYS = {"fingerprint", "stages", "seconds", "prompts"}  # what RunState writes to state.json


def as_written_before(saved, current):
    """A fingerprint as this version writes it, from one that earlier versions wrote with the model's config as
    written: an interpolation there (``pretrained: ${.name}``) stands for the value it has now."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return {key: as_written_before(value, current.get(key)) for key, value in saved.items()}
    if isinstance(saved, str) and saved.startswith("${") and saved.endswith("}"):
        return current
    return saved


class RunState:
    """Finished stages of a run, written atomically after each one.

    Starting again in the same run directory skips what is finished. The fingerprint holds
    everything that determines the results; a mismatch is an error naming the keys. ``unrecorded``: the
    values of keys that earlier versions did not record yet (what those runs had), for their state files.
    """

    def __init__(self, path: str | Path, fingerprint: dict, unrecorded: dict | None = None):
        self.path = Path(path)
        self.stages: dict[str, Any] = {}
        self.seconds = 0.0
        self.prompts = 0
        if self.path.exists():
            fix = (f"nothing else in {self.path.parent} was changed. Delete it to redo this run's stages from the "
                   "start, or use a new run directory (hydra.run.dir=...)")
            saved = read_json(self.path, fix)
            if not isinstance(saved, dict) or not STATE_KEYS <= saved.keys():
                raise ConfigError(f"{self.path} is damaged (a run's state holds {sorted(STATE_KEYS)}); {fix}")
            differ = differing_keys(fingerprint, {**(unrecorded or {}),
                                                 **as_written_before(saved["fingerprint"], fingerprint)})
            if differ:
                raise ConfigError(
                    f"{self.path.parent} holds a run with a different configuration (keys differ: {differ}); "
                    "use a new run directory (hydra.run.dir=...) or the original settings"
                )
            self.stages, self.seconds, self.prompts = saved["stages"], saved["seconds"], saved["prompts"]
            log.info("resuming %s: finished stages %s", self.path.parent, list(self.stages))
        self.fingerprint = fingerprint

    def __contains__(self, stage: str) -> bool:
        return stage in self.stages

    def __getitem__(self, stage: str):
        return self.stages[stage]

    def finish(self, stage: str, value, seconds: float, prompts: int) -> None:
        self.stages[stage] = value
        self.seconds += seconds
        self.prompts += prompts
        if is_main_process():
            atomic_write_json(self.path, {"fingerprint": self.fingerprint, "stages": self.stages,
                                          "seconds": self.seconds, "prompts": self.prompts})


# ---------------------------------------------------------------------------------- accuracies
def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def interval(accuracy: float, n: int) -> str:
    """The Wilson 95% interval of an accuracy over ``n`` examples, as ``46.2–65.3%``."""
    low, high = wilson_interval(round(accuracy * n), n)
    return f"{100 * low:.1f}–{100 * high:.1f}%"


def interval_note(n: int) -> str:
    """The results.md line that says what the 95% interval column is."""
    return (f"* **95% interval**: the Wilson score interval of the test accuracy, a binomial proportion over {n} "
            f"examples: the accuracies that this many right answers out of {n} fit, at 95% confidence. It is the "
            "uncertainty that the test set's size alone leaves.")


def stage_accuracies(results: dict) -> dict[str, float]:
    """Test accuracy (majority vote) of each stage of one ICL run's results, by stage name."""
    accuracies = {"zero_shot": results["zero_shot"]["test_accuracy"]}
    if results.get("supervised_icl"):
        accuracies["supervised_icl"] = results["supervised_icl"]["test_accuracy"]
    accuracies.update({f"round_{r['round']}": r["test_accuracy"] for r in results["rounds"]})
    accuracies.update({f"control_{name}": c["test_accuracy"] for name, c in results.get("controls", {}).items()})
    return accuracies


def stage_name(stage: str) -> str:
    return STAGE_NAMES.get(stage, stage.replace("_", " "))


# -------------------------------------------------------------------------------------- tables
def markdown_table(results: dict) -> str:
    """results.md of an ICL run: each stage's test accuracy with its 95% interval, what the columns mean."""
    n, votes = results["num_test"], results["settings"]["num_repeats"]
    stages = [("zero-shot", results["zero_shot"])]
    if results.get("supervised_icl"):
        stages.append(("supervised ICL (true labels)", results["supervised_icl"]))
    stages += [(f"unsupervised ICL, round {r['round']}", r) for r in results["rounds"]]
    stages += [(ICL_CONTROLS[name][0], c) for name, c in results.get("controls", {}).items()]
    spread = any("test_accuracy_mean" in r for _, r in stages)
    train = any(r.get("train_accuracy") is not None for _, r in stages)
    columns = ["stage", "test accuracy", "95% interval", *["mean ± std over votes"] * spread,
               *["train accuracy"] * train]
    lines = [f"# {results['task']} / {results['model']}", "", "| " + " | ".join(columns) + " |",
             "|" + " --- |" * len(columns)]
    for name, r in stages:
        cells = [name, pct(r["test_accuracy"]), interval(r["test_accuracy"], n)]
        if spread:
            cells.append(f"{pct(r['test_accuracy_mean'])} ± {100 * r['test_accuracy_std']:.1f}"
                         if "test_accuracy_mean" in r else "")
        if train:
            cells.append(pct(r.get("train_accuracy")))
        lines.append("| " + " | ".join(cells) + " |")
    t = results["timing"]
    lines += ["", f"{n} test examples; {t['prompts_scored']} prompts scored in {t['seconds']:.1f} s.", "",
              f"* **test accuracy**: the fraction of the {n} test examples whose majority vote over the stage's "
              f"{votes} votes (one prompt each, with its own demonstrations; a classification zero-shot stage has "
              "one prompt) is right.",
              interval_note(n)]
    if spread:
        lines.append(f"* **mean ± std over votes**: the accuracy of each vote's prompts taken alone, averaged over "
                     f"the {votes} votes, ± their standard deviation. It shows how much the draw of demonstrations "
                     "moves the accuracy; it is not a confidence interval.")
    if train:
        lines.append(f"* **train accuracy**: on the {results.get('num_train')} unlabelled examples, against labels "
                     "the method never reads.")
    return "\n".join(lines + control_lines(results) + diagnostics_table(results)) + "\n"


ICL_CONTROLS = {  # name: (its row, what it is)
    "random_labels": ("control: random labels (round 1's draws)",
                      "*random labels*: round 1's demonstrations and votes, each demonstration shown with a uniformly "
                      "random class, so only their format remains"),
    "batch_calibrated": ("control: batch-calibrated zero-shot",
                         "*batch-calibrated*: zero-shot, each class's probability minus its mean over the unlabelled "
                         "pool"),
    "majority_vote": ("control: zero-shot majority vote, as many samples",
                      "*majority vote*: zero-shot answers sampled as many times per question as the method samples in "
                      "all its stages, the most frequent answer kept")}


def control_lines(results: dict, described: dict = ICL_CONTROLS) -> list[str]:
    """results.md lines that say what the run's controls are and the method's gain over the best of them."""
    if not results.get("controls"):
        return []
    lines = ["* **controls**: label-free baselines at the method's cost (docs/controls.md). "
             + "; ".join(described[name][1] for name in results["controls"]) + "."]
    gain = results.get("gain_over_best_control")
    if gain:
        lines += ["", f"**{gain['method']} against the best control ({described[gain['control']][0]})**: "
                      f"{100 * gain['gain']:+.1f} points on the same {gain['n']} test questions, 95% interval "
                      f"{100 * gain['low']:+.1f} to {100 * gain['high']:+.1f} ({gain['interval']}; "
                      f"{gain['method_only_right']} questions right only with the method, "
                      f"{gain['control_only_right']} only with the control). "
                      + ("The method beats its controls." if gain["low"] > 0 else
                         "The interval holds 0: no gain over the controls is shown." if gain["high"] >= 0 else
                         "The control beats the method.")]
    return lines


def diagnostics_table(results: dict) -> list[str]:
    """results.md lines of the rounds' label-free diagnostics (what a run without gold labels shows)."""
    rounds = [r for r in results["rounds"] if r.get("diagnostics")]
    if not rounds:
        return []
    names = results["settings"]["labels"]
    lines = ["", "## Label-free diagnostics (the unlabelled pool, no gold label read)", "",
             "| round | labels flipped | vote agreement | mean label log-prob | predicted classes |",
             "| --- | --- | --- | --- | --- |"]
    for r in rounds:
        d = r["diagnostics"]
        logprob = "" if d["mean_label_logprob"] is None else f"{d['mean_label_logprob']:.3f}"
        classes = ", ".join(f"{name} {100 * share:.0f}%" for name, share in zip(names, d["class_distribution"]))
        lines.append(f"| {r['round']} | {pct(d['flip_fraction'])} | {pct(d['vote_agreement'])} | {logprob} | {classes} |")
    lines += ["", "* **labels flipped**: the share of the pool whose label changed since the round before (round 1: "
              "since zero-shot); rounds settle as it falls.",
              "* **vote agreement**: the mean share of a query's votes that agree with its majority label.",
              "* **mean label log-prob**: the mean log-probability (over the label set) that the round's prompts, "
              "whose demonstrations carry the previous round's labels, give each query's new label; joint "
              "inference raises it.",
              "* **predicted classes**: the share of the pool given each label; a class that vanishes is a warning."]
    if results.get("stopped_after_round"):
        lines.append(f"* The rounds stopped after round {results['stopped_after_round']}: fewer than "
                     f"{results['settings']['stop_when_flips_below']} of the labels flipped (stop_when_flips_below).")
    return lines


def rounds_figure(results: dict, out_dir: Path) -> None:
    """rounds.png of an ICL run: test accuracy per round beside the zero-shot and supervised lines."""
    from .plots import plot_rounds

    plot_rounds(stage_accuracies(results), f"{results['task']} / {results['model']}", out_dir / "rounds.png",
                results["num_test"], [r.get("diagnostics") for r in results["rounds"]])


def write_results(out_dir: str | Path, results: dict, table: Callable[[dict], str] = markdown_table,
                  figure: Callable[[dict, Path], None] = rounds_figure) -> None:
    """results.json, results.md (``table`` of the results) and the run's ``figure(results, out_dir)``
    (by default those of an ICL run), by the main process only, each file written atomically."""
    if not is_main_process():
        return
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.md", table(results))
    figure(results, out_dir)


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    if not is_main_process():
        return
    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
