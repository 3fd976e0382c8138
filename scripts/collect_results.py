"""Collect results.json files from run and multirun directories into a paper-style table.

    python scripts/collect_results.py outputs multirun                 # Markdown table on stdout
    python scripts/collect_results.py multirun --csv table.csv         # also write CSV

One row per (model, task); columns zero-shot, supervised ICL, unsupervised ICL (last round) and
unsupervised fine-tuning (final) test accuracy, as mean ± std over the seeds found.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

COLUMNS = {
    "zero-shot": lambda r: (r.get("zero_shot") or {}).get("test_accuracy"),
    "supervised ICL": lambda r: (r.get("supervised_icl") or {}).get("test_accuracy"),
    "unsupervised ICL": lambda r: r["rounds"][-1]["test_accuracy"] if r.get("rounds") else None,
    "unsupervised FT": lambda r: (r.get("final") or {}).get("test_accuracy"),
}


def collect(roots: list[Path]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """{(model, task): {column: [accuracy per run]}} over every results.json under ``roots``."""
    table: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for root in roots:
        for path in sorted(root.rglob("results.json")):
            try:
                result = json.loads(path.read_text())
                key = (result["model"], result["task"])
            except (json.JSONDecodeError, KeyError) as err:
                print(f"skipping {path}: {err}", file=sys.stderr)
                continue
            for column, read in COLUMNS.items():
                value = read(result)
                if value is not None:
                    table[key][column].append(100 * value)
    return table


def cell(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path, help="run or multirun directories")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV here")
    args = parser.parse_args()
    table = collect(args.roots)
    if not table:
        sys.exit(f"no results.json under {', '.join(map(str, args.roots))}")
    columns = [c for c in COLUMNS if any(table[k][c] for k in table)]
    rows = [[model, task, *(cell(table[(model, task)][c]) for c in columns)] for model, task in sorted(table)]
    print("| model | task | " + " | ".join(columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["model", "task", *columns])
            writer.writerows(rows)


if __name__ == "__main__":
    main()
