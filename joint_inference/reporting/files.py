"""What a run over the user's own file (``dataset=local``) writes besides its results: predictions.csv and
predictions.jsonl, every row's labels (the file's columns, the labels of every stage, the final label), and
without a label column the results of a run that has no accuracy (its label-free diagnostics)."""
from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.distributed import is_main_process
from ..core.utils import atomic_write
from ..data.files import FileData
from .plots import plot_rounds
from .results import diagnostics_table, pct, write_results

log = logging.getLogger(__name__)
PREDICTION_COLUMNS = ("zero_shot_label", "round_{t}_label", "final_label", "vote_margin")


def prediction_table(data: FileData, label_names: Sequence[str], stages: dict[str, dict],
                     extra: dict[str, dict[str, Sequence]]) -> tuple[list[str], list[dict]]:
    """(columns, rows) of predictions.csv: ``split`` (when the file was split), ``row`` (its place among
    the file's rows, from 0), the file's columns, then each stage's label, the final label (the last
    stage's) and the ``extra`` columns (e.g. ``{"vote_margin": {split: values}}``). ``stages``:
    ``{"zero_shot": {split: ids}, "round_1": ..., ...}`` in order."""
    ours = [f"{stage}_label" for stage in stages if stage != "final"] + ["final_label", *extra]
    clash = [c for c in data.columns if c in ours or c in ("row", "split")]
    if clash:
        log.warning("the input's columns %s are replaced by this run's in predictions.csv", clash)
    splits = ("test",) if data.transductive else ("train", "test")
    columns = ["split"] * (not data.transductive) + ["row"] + [c for c in data.columns if c not in clash] + ours
    final = list(stages)[-1]
    rows = []
    for split in splits:
        for i, row in enumerate(data.file_rows[split]):
            out = {"split": split} if not data.transductive else {}
            out["row"] = int(data.source_rows[split][i])
            out.update({c: row.get(c) for c in data.columns if c not in clash})
            for stage, predictions in stages.items():
                if stage != "final":
                    out[f"{stage}_label"] = label_names[predictions[split][i]]
            out["final_label"] = label_names[stages[final][split][i]]
            out.update({name: values[split][i] for name, values in extra.items()})
            rows.append(out)
    return columns, rows


def write_predictions(out_dir: Path, columns: list[str], rows: list[dict]) -> None:
    """predictions.csv and predictions.jsonl, each written atomically (main process only)."""
    if not is_main_process():
        return

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v if isinstance(v, (str, int, float)) else
                             json.dumps(v, default=str) for k, v in row.items()})

    atomic_write(out_dir / "predictions.csv", write_csv)
    atomic_write(out_dir / "predictions.jsonl",
                 lambda f: f.writelines(json.dumps({c: row.get(c) for c in columns}, default=str) + "\n"
                                        for row in rows))


def vote_margins(votes: Sequence[Sequence[int]], final: Sequence[int]) -> list[float]:
    """The share of each query's votes that went to its final label."""
    votes = np.asarray(votes)
    return [round(float(v), 4) for v in (votes == np.asarray(final)[:, None]).mean(1)]


def predict_only_table(results: dict) -> str:
    """results.md of a run without labels: what was labelled, the label-free diagnostics per round,
    and where the labels are."""
    data, s = results["data"], results["settings"]
    lines = [f"# {results['task']} ({Path(data['path']).name}) / {results['model']}: labels without a label column", "",
             f"No label column (dataset.label_field): the run labelled {results['num_test']} of the file's "
             f"{data['rows_in_file']} rows without reading a label, so there is no accuracy. Each row's labels are in "
             "predictions.csv and predictions.jsonl: the zero-shot label, each round's, the final label and its vote "
             "margin.", ""]
    shares = results["final"]["class_distribution"]
    lines += ["| labels | " + " | ".join(s["labels"]) + " |", "| --- |" + " --- |" * len(s["labels"]),
              "| zero-shot | " + " | ".join(pct(x) for x in results["zero_shot"]["class_distribution"]) + " |",
              "| final | " + " | ".join(pct(x) for x in shares) + " |", "",
              f"Final labels: round {results['final']['round']}'s majority over {s['num_repeats']} votes; mean vote "
              f"margin {pct(results['final']['mean_vote_margin'])} (the share of a row's votes that went to its final "
              "label)." if results["final"]["round"] else "Final labels: zero-shot (T=0).",
              f"{results['timing']['prompts_scored']} prompts scored in {results['timing']['seconds']:.1f} s."]
    lines += [f"* {note}" for note in results.get("notes", [])]
    return "\n".join(lines + diagnostics_table(results)) + "\n"


def file_run_results(out_dir: Path, results: dict, data: FileData, zero_shot: dict, rounds: list[dict],
                     label_names: list[str], num_examples: int | None) -> None:
    """What an ICL run over a file adds to its results: predictions.csv/.jsonl (every row's labels),
    where the rows came from, the final labels' class shares and vote margins, and, without labels,
    results.json, results.md and rounds.png of the label-free diagnostics (no accuracy anywhere)."""
    stages = {"zero_shot": zero_shot, **{f"round_{t}": r for t, r in enumerate(rounds, 1)}}
    final = rounds[-1] if rounds else zero_shot
    splits = ("test",) if data.transductive else ("train", "test")
    margins = {s: vote_margins(final[f"{s}_votes"], final[s]) if rounds else [None] * len(final[s]) for s in splits}
    columns, rows = prediction_table(data, label_names, stages, {"vote_margin": margins})
    write_predictions(out_dir, columns, rows)
    k = len(label_names)
    shares = lambda labels: (np.bincount(labels, minlength=k) / len(labels)).tolist()
    results["data"] = {"path": data.path, "rows_in_file": data.rows_in_file, "label_field": data.label_field,
                       "num_examples": num_examples, "transductive": data.transductive}
    results["final"] = {"round": len(rounds), "class_distribution": shares(final["test"]),
                        "mean_vote_margin": float(np.mean(margins["test"])) if rounds else None}
    results["predictions"] = ["predictions.csv", "predictions.jsonl"]
    if data.labelled:
        return
    results["zero_shot"] = {"class_distribution": shares(zero_shot["test"])}
    results["notes"] = [
        "No label column (dataset.label_field unset): predict-only. No accuracy is computed; the label-free "
        "diagnostics below describe the rounds.",
        "The supervised baseline (N-shot ICL with true labels) needs labels and was skipped."]
    if not rounds:
        results["notes"].append("T=0: the final labels are the zero-shot labels (one prompt each: no vote margin).")

    def figure(results, out):
        plot_rounds(None, f"{results['task']} / {results['model']}", out / "rounds.png",
                    diagnostics=[r.get("diagnostics") for r in results["rounds"]], class_names=label_names,
                    zero_shot_shares=results["zero_shot"]["class_distribution"])

    write_results(out_dir, results, predict_only_table, figure)


def file_finetuning_results(out_dir: Path, results: dict, data: FileData, zero_shot: dict[str, list[int]],
                            trained: dict[str, tuple], label_names: list[str]) -> None:
    """What a fine-tuning run over a file adds to its results: predictions.csv/.jsonl with every row's
    zero-shot label (the frozen model's), its label after training and the task encoder's probability
    of it (``trained``: split -> (labels, probabilities)); without labels, the class shares in place of
    the accuracies (which stay None)."""
    stages = {"zero_shot": zero_shot, "final": {s: labels.tolist() for s, (labels, _) in trained.items()}}
    extra = {"final_probability": {s: [round(float(p), 4) for p in probs] for s, (_, probs) in trained.items()}}
    columns, rows = prediction_table(data, label_names, stages, extra)
    write_predictions(out_dir, columns, rows)
    k = len(label_names)
    shares = lambda labels: (np.bincount(labels, minlength=k) / len(labels)).tolist()
    results["labelled"] = data.labelled
    results["data"] = {"path": data.path, "rows_in_file": data.rows_in_file, "label_field": data.label_field,
                       "transductive": data.transductive}
    results["predictions"] = ["predictions.csv", "predictions.jsonl"]
    results["zero_shot"]["class_distribution"] = shares(zero_shot["test"])
    results["final"]["class_distribution"] = shares(stages["final"]["test"])
    if not data.labelled:
        results["notes"] = ["No label column (dataset.label_field unset): no test accuracy exists; the run trained "
                            "on the file's rows and labelled them (predictions.csv)."]
