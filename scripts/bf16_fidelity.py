"""fp32 against bf16 on this CPU: the same runs in both dtypes, compared stage by stage.

    DATA_ROOT=../shared/data python scripts/bf16_fidelity.py              # runs what is missing, then the table
    python scripts/bf16_fidelity.py --collect                             # the table from the runs so far

The runs: the quickstart (``+experiment=quickstart``), unsupervised ICL on SST-2, TREC, RTE and AG News at
the laptop table's settings (scripts/laptop_table1.py, seed 0) and its fine-tuning run on SST-2, each
once with ``model.dtype=float32`` and once with ``model.dtype=bfloat16``, back to back, one at a time.
For each stage: both test accuracies, the fp32 one's Wilson 95% interval, whether the bf16 accuracy lies
inside it, and the share of test predictions (and of unlabelled-pool labels) that agree; for fine-tuning
the loss curves' largest gap and both final accuracies.

The rounds of two runs part ways as soon as one pool label differs: every later demonstration set is drawn
from other classes' members, as with another seed. So each round is also scored in bf16 on the fp32 run's
own prompts (``same prompts``: a bf16 run that starts from the fp32 run's earlier stages, copied from its
state file), which measures what the dtype alone changes. Every run is a resumable run directory, so the
command can be stopped and started again. Figures go to ``--out`` (JSON) and a Markdown table beside it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from laptop_table1 import Job, machine_facts

from joint_inference.core.utils import atomic_write_json, atomic_write_text, wilson_interval

DTYPES = ["float32", "bfloat16"]
JOBS = ["quickstart", *(f"icl/gemma3_270m/{task}/seed0" for task in ["sst2", "trec", "rte", "ag_news"]),
        "uft/gemma3_270m/sst2/seed0"]


def command(name: str, dtype: str, root: Path) -> list[str]:
    run_dir = root / dtype / name
    if name == "quickstart":
        return [sys.executable, str(REPO / "unsupervised_icl_llm.py"), "+experiment=quickstart",
                f"model.dtype={dtype}", "allow_long_cpu_run=true", "progress=false", "save_predictions=true",
                f"hydra.run.dir={run_dir}"]
    kind, model, task, seed = name.split("/")
    job = Job(kind, model, task, int(seed.removeprefix("seed")))
    return [*job.command(root / dtype), f"model.dtype={dtype}", *(["save_predictions=true"] * (kind == "icl"))]


def same_prompts_dir(root: Path, name: str, t: int) -> Path:
    return root / "same_prompts" / name / f"round_{t}"


def same_prompts_command(name: str, t: int, root: Path) -> list[str]:
    """Round ``t`` in bf16 after the fp32 run's stages before it (copied into its run directory first)."""
    args = [a for a in command(name, "bfloat16", root) if not a.startswith(("hydra.run.dir=", "T="))]
    return [*args, f"T={t}", "controls=[]", f"hydra.run.dir={same_prompts_dir(root, name, t)}"]


def start_from_fp32(name: str, t: int, root: Path) -> None:
    """The fp32 run's stages before round ``t`` as a bf16 run's own (its state file and run record)."""
    state = json.loads((root / "float32" / name / "state.json").read_text())
    keep = ("zero_shot/", "supervised_icl/", *(f"round_{r}/" for r in range(1, t)))
    state["stages"] = {k: v for k, v in state["stages"].items() if k.startswith(keep)}
    state["fingerprint"]["dtype"] = state["fingerprint"]["model"]["dtype"] = "bfloat16"
    run_dir = same_prompts_dir(root, name, t)
    (run_dir / ".run").mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / ".run" / "run.json", {"entry": "unsupervised_icl_llm"})
    atomic_write_json(run_dir / "state.json", state)


def finished(name: str, run_dir: Path) -> Path:
    """The file a finished run of ``name`` leaves (ICL: its predictions, which the comparison reads)."""
    return run_dir / ("results.json" if name.startswith("uft") else "predictions.jsonl")


def wall_seconds(run_dir: Path) -> Path:
    """Beside the run directory, which holds only what the run writes."""
    return run_dir.parent / f"{run_dir.name}.seconds.json"


def read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def agreement(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def icl_rows(runs: dict[str, Path], same_prompts: dict[int, Path] | None = None) -> list[dict]:
    """One row per stage: accuracies in both dtypes, fp32's Wilson interval, agreement of predictions."""
    states = {dtype: read_json(run / "state.json")["stages"] for dtype, run in runs.items()}
    results = {dtype: read_json(run / "results.json") for dtype, run in runs.items()}
    gold = [row["label"] for row in map(json.loads, (runs["float32"] / "predictions.jsonl").read_text().splitlines())
            if row["split"] == "test"]
    rows = []
    for stage in [s.removesuffix("/test") for s in states["float32"] if s.endswith("/test")]:
        predicted = {dtype: states[dtype][f"{stage}/test"]["test"] for dtype in DTYPES}
        correct = {dtype: sum(p == g for p, g in zip(predicted[dtype], gold, strict=True)) for dtype in DTYPES}
        low, high = wilson_interval(correct["float32"], len(gold))
        bf16 = correct["bfloat16"] / len(gold)
        row = {"stage": stage, "n": len(gold), "fp32": correct["float32"] / len(gold), "bf16": bf16,
               "fp32_interval": [low, high], "bf16_inside": low <= bf16 <= high,
               "test_agreement": agreement(predicted["float32"], predicted["bfloat16"])}
        train = [states[dtype].get(f"{stage}/train", {}).get("train") for dtype in DTYPES]
        if all(train):
            row["pool_agreement"] = agreement(*train)
        t = int(stage.split("_")[1]) if stage.startswith("round_") else None
        if t in (same_prompts or {}) and (same_prompts[t] / "results.json").exists():
            same = read_json(same_prompts[t] / "state.json")["stages"]
            row["same_prompts"] = {
                "bf16": sum(p == g for p, g in zip(same[f"{stage}/test"]["test"], gold, strict=True)) / len(gold),
                "test_agreement": agreement(predicted["float32"], same[f"{stage}/test"]["test"])}
            if f"{stage}/train" in same and train[0]:
                row["same_prompts"]["pool_agreement"] = agreement(train[0], same[f"{stage}/train"]["train"])
        rows.append(row)
    for row in rows:  # the run's own reported accuracy must be the one recomputed here
        stage, fp32 = row["stage"], results["float32"]
        reported = (fp32["controls"][stage.removeprefix("control_")] if stage.startswith("control_") else
                    fp32["rounds"][int(stage.split("_")[1]) - 1] if stage.startswith("round_") else
                    fp32[stage])["test_accuracy"]
        assert abs(reported - row["fp32"]) < 1e-9, (row["stage"], reported, row["fp32"])
    return rows


def uft_rows(runs: dict[str, Path]) -> list[dict]:
    """Zero-shot and each evaluation: accuracies in both dtypes, fp32's interval; the loss curves' gap."""
    results = {dtype: read_json(run / "results.json") for dtype, run in runs.items()}
    losses = {dtype: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                      if "loss" in json.loads(line)] for dtype, run in runs.items()}
    n = results["float32"]["num_test"]
    evaluations = {dtype: [("zero_shot", r["zero_shot"]["test_accuracy"])]
                   + [(f"step {h['step']}", h["test_accuracy"]) for h in r["history"]]
                   for dtype, r in results.items()}
    rows = []
    for (stage, fp32), (_, bf16) in zip(evaluations["float32"], evaluations["bfloat16"], strict=True):
        low, high = wilson_interval(round(fp32 * n), n)
        rows.append({"stage": stage, "n": n, "fp32": fp32, "bf16": bf16, "fp32_interval": [low, high],
                     "bf16_inside": low <= bf16 <= high})
    gaps = [abs(a - b) for a, b in zip(losses["float32"], losses["bfloat16"], strict=True)]
    rows[-1]["loss_curve"] = {"steps": len(gaps), "max_abs_gap": max(gaps), "mean_abs_gap": sum(gaps) / len(gaps),
                              "fp32_first_last": [losses["float32"][0], losses["float32"][-1]],
                              "bf16_first_last": [losses["bfloat16"][0], losses["bfloat16"][-1]]}
    return rows


def collect(root: Path) -> dict:
    report = {}
    for name in JOBS:
        runs = {dtype: root / dtype / name for dtype in DTYPES}
        if not all(finished(name, run).exists() for run in runs.values()):
            continue
        seconds = {dtype: read_json(wall_seconds(run)) for dtype, run in runs.items()}
        same = {t: same_prompts_dir(root, name, t) for t in range(1, 9)}
        report[name] = {"rows": uft_rows(runs) if name.startswith("uft") else icl_rows(runs, same),
                        "wall_seconds": seconds}
    return report


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    lines = [("| run | stage | n | fp32 | fp32 95% interval | bf16 | bf16 inside | test agreement | pool agreement | "
              "same prompts: bf16, test agreement, pool agreement |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, job in report.items():
        for row in job["rows"]:
            low, high = row["fp32_interval"]
            same = row.get("same_prompts")
            lines.append(f"| {name} | {row['stage']} | {row['n']} | {pct(row['fp32'])} | {pct(low)}–{pct(high)} | "
                         f"{pct(row['bf16'])} | {'yes' if row['bf16_inside'] else '**no**'} | "
                         f"{pct(row['test_agreement']) if 'test_agreement' in row else ''} | "
                         f"{pct(row['pool_agreement']) if 'pool_agreement' in row else ''} | "
                         + (f"{pct(same['bf16'])}, {pct(same['test_agreement'])}"
                            + (f", {pct(same['pool_agreement'])}" if "pool_agreement" in same else "") if same else "")
                         + " |")
    lines += ["", "| run | fp32 wall s | bf16 wall s | speed-up |", "| --- | --- | --- | --- |"]
    for name, job in report.items():
        fp32, bf16 = job["wall_seconds"]["float32"], job["wall_seconds"]["bfloat16"]
        if fp32 and bf16:
            lines.append(f"| {name} | {fp32:.0f} | {bf16:.0f} | {fp32 / bf16:.1f}× |")
    for name, job in report.items():
        curve = job["rows"][-1].get("loss_curve")
        if curve:
            lines += ["", (f"{name}: loss over {curve['steps']} steps, fp32 {curve['fp32_first_last'][0]:.4f} → "
                           f"{curve['fp32_first_last'][1]:.4f}, bf16 {curve['bf16_first_last'][0]:.4f} → "
                           f"{curve['bf16_first_last'][1]:.4f}; largest gap {curve['max_abs_gap']:.4f}, "
                           f"mean {curve['mean_abs_gap']:.4f}.")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "bf16_fidelity", help="run directories")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "bf16_fidelity.json")
    parser.add_argument("--collect", action="store_true", help="only write the table from the finished runs")
    parser.add_argument("--only", nargs="+", default=JOBS, choices=JOBS, help="these runs, in this order")
    parser.add_argument("--same-prompts", action="store_true",
                        help="only score each finished ICL run's rounds in bf16 on its fp32 prompts (see above)")
    args = parser.parse_args()
    if args.same_prompts:
        for name in [n for n in args.only if not n.startswith("uft")]:
            rounds = sorted(int(k.split("/")[0].split("_")[1]) for k in
                            read_json(args.root / "float32" / name / "state.json")["stages"] if k.startswith("round_"))
            for t in sorted(set(rounds)):
                run_dir = same_prompts_dir(args.root, name, t)
                if (run_dir / "results.json").exists():
                    continue
                print(f"{name} round {t} [bfloat16, fp32's prompts]", flush=True)
                start_from_fp32(name, t, args.root)
                with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
                    done = subprocess.run(same_prompts_command(name, t, args.root), stdout=log,
                                          stderr=subprocess.STDOUT, cwd=REPO, check=False)
                if done.returncode:
                    raise SystemExit(f"error: {name} round {t} failed (exit {done.returncode}); see {log.name}")
        args.collect = True
    if not args.collect:
        for name in args.only:
            for dtype in DTYPES:
                run_dir = args.root / dtype / name
                if finished(name, run_dir).exists():
                    continue
                print(f"{name} [{dtype}]", flush=True)
                run_dir.mkdir(parents=True, exist_ok=True)
                started = time.perf_counter()
                with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
                    done = subprocess.run(command(name, dtype, args.root), stdout=log, stderr=subprocess.STDOUT,
                                          cwd=REPO, check=False)
                if done.returncode:
                    raise SystemExit(f"error: {name} [{dtype}] failed (exit {done.returncode}); see {log.name}")
                if not wall_seconds(run_dir).exists():  # a run resumed only to write its predictions keeps its time
                    atomic_write_json(wall_seconds(run_dir), time.perf_counter() - started)
                report = collect(args.root)
                atomic_write_json(args.out, {"machine": machine_facts(), "jobs": JOBS, "dtypes": DTYPES,
                                             "report": report})
                atomic_write_text(args.out.with_suffix(".md"), markdown(report))
    report = collect(args.root)
    atomic_write_json(args.out, {"machine": machine_facts(), "jobs": JOBS, "dtypes": DTYPES, "report": report})
    atomic_write_text(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
