"""Collect results.json files from run and multirun directories into tables of mean ± std over seeds.

    python scripts/collect_results.py outputs multirun                 # Markdown on stdout
    python scripts/collect_results.py multirun --csv table.csv         # also write CSV

Runs pool into one row only when nothing but their seed tells them apart, so that a spread is a
spread over seeds and never over settings or data. A row's runs share:

* the kind of run, read from the results.json layout: ICL (``rounds``), fine-tuning (``final``),
  generation (stages that count ``answered`` responses) and MMLU's all-subjects summary (``macro``:
  the mean over subjects), which never pools with a one-subject run;
* model and task;
* every recorded setting but those in IGNORED: results.json ``settings`` and the ones written beside
  it (fine-tuning's ``task_encoder`` and early-stopping rule, the summary's number of subjects). A
  setting that one run lacks counts as different (runs from before ``protocol`` was recorded do not
  pool with ``protocol=clean``). A results.json without ``settings`` pools only with others without
  them, flagged;
* the data fingerprint: fine-tuning writes it in results.json, ICL and generation runs in the
  state.json beside it. Runs that differ in nothing else are kept in separate rows, flagged, and
  stderr names their directories.

Per-subject runs of an all-subjects MMLU run (``<run>/subjects/<subject>``) count through that run's
summary only. Cells are test accuracy in percent, mean ± sample standard deviation (ddof=1) over
seeds, and n; one run shows its value and n=1. Markdown has a table per kind of run: settings equal
in all its rows go in a line above it, the others are columns. The CSV has a row per group: kind,
model, task, each setting, the data digest, seeds, ``<metric>_mean``, ``_std`` and ``_n`` (numbers,
empty where there are none), flags and the run directories.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Recorded settings that do not change a result: the seed (rows pool over it), where a run ran
# (``device``: cpu, cuda:<i>, or for ICL ``vllm``, whose scores equal the hf backend's), how many
# data-parallel processes fine-tuning split each step over (the same steps as one process's) and the
# controls run beside the method (they add columns, and change none of the method's). Batch size and
# progress bars are not recorded (fine-tuning's ``B``, the sequences per step, is a setting).
IGNORED = ("seed", "device", "processes", "controls")
METRICS = {"zero_shot": "zero-shot", "supervised_icl": "supervised ICL", "unsupervised_icl": "unsupervised ICL",
           "unsupervised_ft": "unsupervised FT", "control_random_labels": "control: random labels",
           "control_batch_calibrated": "control: batch-calibrated", "control_majority_vote": "control: majority vote",
           "gain_over_best_control": "gain over best control (points)"}


@dataclass
class Run:
    directory: Path
    kind: str
    model: str
    task: str
    recorded: bool  # results.json has ``settings``
    settings: dict  # without IGNORED
    seed: object
    data: str | None  # data fingerprint; None where the run records none
    metrics: dict[str, float]  # test accuracy in percent, by METRICS key


@dataclass
class Row:
    runs: list[Run]
    flags: list[str] = field(default_factory=list)

    def __getattr__(self, name):  # kind, model, task, recorded, settings and data: the same in every run
        return getattr(self.__dict__["runs"][0], name)

    def seeds(self) -> str:
        """The seeds pooled, in order; ? for a run that records none."""
        seeds = sorted((r.seed for r in self.runs), key=lambda s: (0, s) if isinstance(s, int) else (1, str(s)))
        return ",".join("?" if s is None else str(s) for s in seeds)

    def stats(self, metric: str) -> tuple[float | None, float | None, int]:
        """Mean, sample std (None below two runs) and number of runs that report ``metric``."""
        values = [r.metrics[metric] for r in self.runs if metric in r.metrics]
        if not values:
            return None, None, 0
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None, len(values)


def kind_of(result: dict) -> str:
    """ICL, fine-tuning or generation, from the fields each writes: their zero-shot numbers never compare."""
    if "macro" in result:
        return "ICL, MMLU mean over subjects"
    if "final" in result or "history" in result:
        return "fine-tuning"
    if "answered" in (result.get("zero_shot") or {}):
        return "generation"
    if "rounds" in result:
        return "ICL"
    raise ValueError("not the results of an ICL, fine-tuning or generation run (no rounds, final or macro)")


def recorded_settings(result: dict) -> dict:
    """``settings`` and the settings a run writes beside them."""
    settings = dict(result.get("settings") or {})
    settings.update({f"config.{k}": v for k, v in settings.pop("config", {}).items()})  # fine-tuning's whole config
    if "task_encoder" in result:
        settings["task_encoder"] = result["task_encoder"]
    stopping = result.get("early_stopping") or {}  # the rule; stopped_at and flip_rates are outcomes
    settings.update({f"early_stopping.{k}": stopping[k] for k in ("flip_rate_below", "window") if k in stopping})
    if "num_subjects" in result:
        settings["subjects"] = result["num_subjects"]
    return settings


def data_fingerprint(directory: Path, result: dict) -> str | None:
    """The run's data digest: in results.json (fine-tuning), else in the state.json beside it; for an
    all-subjects run, a digest of its subjects' ones."""
    def digest(state: Path) -> str:
        return json.loads(state.read_text())["fingerprint"]["data"]

    if result.get("data_fingerprint"):
        return result["data_fingerprint"]
    if (directory / "state.json").exists():
        return digest(directory / "state.json")
    subjects = sorted((directory / "subjects").glob("*/state.json"))
    if not subjects:
        return None
    return hashlib.sha256(json.dumps([(s.parent.name, digest(s)) for s in subjects]).encode()).hexdigest()[:16]


def metrics_of(result: dict) -> dict[str, float]:
    """The test accuracies (percent) a run reports: zero-shot, supervised ICL, last UICL round, final UFT, the
    controls, and the method's gain over the best control (points)."""
    if "macro" in result:
        stages = result["macro"]
        rounds = [s for s in stages if s.startswith("round_")]
        found = {"zero_shot": stages.get("zero_shot"), "supervised_icl": stages.get("supervised_icl"),
                 "unsupervised_icl": stages[rounds[-1]] if rounds else None,
                 **{stage: a for stage, a in stages.items() if stage.startswith("control_")}}
    else:
        def accuracy(stage):
            return (stage or {}).get("test_accuracy")

        found = {"zero_shot": accuracy(result.get("zero_shot")),
                 "supervised_icl": accuracy(result.get("supervised_icl")),
                 "unsupervised_icl": accuracy(result["rounds"][-1]) if result.get("rounds") else None,
                 "unsupervised_ft": accuracy(result.get("final")),
                 **{f"control_{name}": accuracy(c) for name, c in (result.get("controls") or {}).items()},
                 "gain_over_best_control": (result.get("gain_over_best_control") or {}).get("gain")}
    return {metric: 100 * value for metric, value in found.items() if value is not None}


def read_run(path: Path) -> Run:
    result = json.loads(path.read_text())
    settings = recorded_settings(result)
    return Run(path.parent, kind_of(result), result["model"], result["task"], "settings" in result,
               {k: v for k, v in settings.items() if k not in IGNORED}, settings.get("seed"),
               data_fingerprint(path.parent, result), metrics_of(result))


def collect(roots: list[Path]) -> list[Run]:
    """Every run with a results.json under ``roots``, each once; unreadable ones are skipped with a message."""
    runs, seen = [], set()
    for root in roots:
        for path in sorted(root.rglob("results.json")):
            directory = path.parent
            if directory.resolve() in seen:
                continue
            seen.add(directory.resolve())
            if directory.parent.name == "subjects":  # one subject of an all-subjects run
                if not (directory.parent.parent / "results.json").exists():
                    print(f"skipping {directory}: a subject of an all-subjects run without its summary "
                          "(unfinished?)", file=sys.stderr)
                continue
            try:
                runs.append(read_run(path))
            except (KeyError, TypeError, ValueError) as err:
                print(f"skipping {path}: {type(err).__name__}: {err}", file=sys.stderr)
    return runs


def same_settings(run: Run) -> tuple:
    return run.kind, run.model, run.task, run.recorded, json.dumps(run.settings, sort_keys=True, default=str)


def group(runs: list[Run]) -> list[Row]:
    """Runs pooled by everything but their seed, flagged where they cannot be trusted to compare."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        groups[(*same_settings(run), str(run.data))].append(run)
    rows = [Row(members) for _, members in sorted(groups.items())]
    by_settings = defaultdict(list)
    for row in rows:
        by_settings[same_settings(row)].append(row)
    for clash in by_settings.values():
        if len(clash) == 1:
            continue
        print(f"warning: {clash[0].kind} runs of {clash[0].model} on {clash[0].task} with the same settings used "
              "different data; kept in separate rows:\n" + "\n".join(
                  f"  data {row.data}: {', '.join(str(r.directory) for r in row.runs)}" for row in clash),
              file=sys.stderr)
        for row in clash:
            row.flags.append(f"data {(row.data or 'unrecorded')[:8]} differs from another row's")
    for row in rows:
        if not row.recorded:
            row.flags.append("no settings in results.json")
        repeated = [str(s) for s, count in Counter(r.seed for r in row.runs).items()
                    if count > 1 and s is not None]
        if repeated:
            row.flags.append(f"seed {', '.join(repeated)} more than once")
    return rows


def show(value) -> str:
    """A setting for a Markdown cell: one line; a long value cut, with a hash that tells cut values apart."""
    text = "—" if value is None else value if isinstance(value, str) else json.dumps(value)
    if len(text) > 32:
        text = f"{text[:24]}… #{hashlib.sha256(text.encode()).hexdigest()[:6]}"
    return text.replace("\n", "\\n").replace("|", "\\|")


def cell(row: Row, metric: str) -> str:
    mean, std, n = row.stats(metric)
    if not n:
        return ""
    return f"{mean:.1f} (n=1)" if std is None else f"{mean:.1f} ± {std:.1f} (n={n})"


def setting_keys(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row.settings))


def markdown(rows: list[Row]) -> str:
    lines = []
    for kind in sorted({row.kind for row in rows}):
        part = [row for row in rows if row.kind == kind]
        keys = setting_keys(part)
        varying = [k for k in keys if len({show(row.settings.get(k)) for row in part}) > 1]
        shared = [f"{k}={show(part[0].settings.get(k))}" for k in keys if k not in varying]
        metrics = [m for m in METRICS if any(row.stats(m)[2] for row in part)]
        flags = any(row.flags for row in part)
        header = ["model", "task", *varying, *(METRICS[m] for m in metrics), "seeds", *(["flags"] if flags else [])]
        runs = sum(len(row.runs) for row in part)
        lines += [f"## {kind}: {runs} run{'s' * (runs > 1)} in {len(part)} row{'s' * (len(part) > 1)}", ""]
        if shared:
            lines += ["Same in every row: " + ", ".join(shared) + ".", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for row in part:
            values = [row.model, row.task, *(show(row.settings.get(k)) for k in varying),
                      *(cell(row, m) for m in metrics), row.seeds(),
                      *(["; ".join(row.flags)] if flags else [])]
            lines.append("| " + " | ".join(values) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    def plain(value):
        return "" if value is None else value if isinstance(value, (str, int, float)) else json.dumps(value)

    keys = setting_keys(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "model", "task", *keys, "data", "seeds",
                         *(f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n")), "flags", "runs"])
        for row in rows:
            writer.writerow([row.kind, row.model, row.task, *(plain(row.settings.get(k)) for k in keys),
                             plain(row.data), row.seeds(), *(plain(x) for m in METRICS for x in row.stats(m)),
                             "; ".join(row.flags), ";".join(str(r.directory) for r in row.runs)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="run or multirun directories")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV here")
    args = parser.parse_args()
    runs = collect(args.roots)
    if not runs:
        sys.exit(f"no results.json under {', '.join(map(str, args.roots))}")
    rows = group(runs)
    print(markdown(rows), end="")
    if args.csv:
        write_csv(rows, args.csv)


if __name__ == "__main__":
    main()
