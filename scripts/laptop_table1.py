"""The paper's Table 1 in miniature, with the embedded real models on a laptop CPU.

    DATA_ROOT=../shared/data python scripts/laptop_table1.py            # run what is missing, then the table
    python scripts/laptop_table1.py --collect                           # the table from the runs so far

Every job is one call of an entry script into its own run directory under ``--root``; a job whose
results.json exists is skipped and an interrupted one resumes (runs resume by stage), so the command
can be stopped and started again at any time. Jobs run in an order that fills the table early: seed 0
of unsupervised ICL on every task, fine-tuning, MMLU, the SmolLM2 negative control, then the other
seeds, fine-tuning's first (it is the cheaper). After each job the figures so far go to ``--out``
(JSON) and a Markdown table beside it.

The settings (SETTINGS below) are written into the output. On a quiet 2-core CPU a job takes 5 minutes
(GSM8K, TREC) to about an hour (RTE and BoolQ ICL, whose inputs are long), and the whole table many
hours, not the two first aimed at: the JSON's ``seconds_all_runs`` sums the jobs done.
Demonstrations are shared by blocks of 8 queries (``support_sampling=shared``), which encodes each
demonstration set once per block; per-query sampling, the original's, costs about four times as much
on the long-input tasks. Seeds change the demonstration draws, the votes' tie-breaks and the
fine-tuning samples; every seed sees the same examples (``dataset.sample_seed`` stays 42), so the
spread is that of the method, not of the test set, whose size is printed beside each figure.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from joint_inference.core.utils import atomic_write_json, atomic_write_text

TASKS = ["sst2", "subj", "trec", "ag_news", "rte", "boolq", "mnli"]
# the splits ../shared/data holds for each task (the configs name the hub's training splits)
LOCAL_SPLITS = {"ag_news": "[test]", "boolq": "[validation]", "mnli": "[validation_matched]"}
MMLU_SUBJECTS = ["abstract_algebra", "jurisprudence", "us_foreign_policy", "business_ethics"]  # STEM, humanities,
# social sciences, other: one of each of MMLU's four groups, about 100 questions each
NEGATIVE_CONTROL_TASKS = ["sst2", "subj", "trec"]
SEEDS = [0, 1]
SETTINGS = {
    "icl": ["dataset.num_examples=300", "N=8", "T=3", "num_repeats=3", "support_sampling=shared", "block_size=8"],
    "mmlu": ["N=8", "T=3", "num_repeats=3", "support_sampling=shared", "block_size=8"],
    # Table 2's GSM8K row, at the floor for a 270M model: few questions, short answers, one round
    "gsm8k": ["dataset.num_examples=30", "N=4", "T=1", "num_repeats=1", "max_new_tokens=192"],
    "uft": ["dataset.num_examples=300", "batch_size=4", "N=4", "num_iterations=40", "eval_freq=10", "ckpt_freq=10",
            "optimization.lr=1e-4"],
}
MODELS = {"gemma3_270m": "Gemma-3-270M", "smollm2_135m": "SmolLM2-135M-Instruct"}


@dataclass
class Job:
    kind: str  # icl | uft
    model: str
    task: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.model}/{self.task}/seed{self.seed}"

    def command(self, root: Path) -> list[str]:
        script = "unsupervised_ft_llm.py" if self.kind == "uft" else "unsupervised_icl_llm.py"
        if self.task == "mmlu":
            dataset = ["dataset=mmlu", f"dataset.subjects=[{','.join(MMLU_SUBJECTS)}]", *SETTINGS["mmlu"]]
        elif self.task == "gsm8k":
            dataset = ["dataset=gsm8k", *SETTINGS["gsm8k"]]
        else:
            dataset = [f"dataset={self.task}", *SETTINGS[self.kind]]
            if self.task in LOCAL_SPLITS:
                dataset.append(f"dataset.source_splits={LOCAL_SPLITS[self.task]}")
        return [sys.executable, str(REPO / script), f"model={self.model}", *dataset, f"seed={self.seed}",
                "device=cpu", "allow_long_cpu_run=true", "progress=false", f"hydra.run.dir={root / self.name}"]


def selected_jobs(patterns: list[str]) -> list[Job]:
    """The jobs whose names match any pattern, in the order of the patterns (to choose what runs first)."""
    if not patterns:
        return all_jobs()
    chosen = []
    for pattern in patterns:
        chosen += [job for job in all_jobs() if fnmatch.fnmatch(job.name, pattern) and job not in chosen]
    if not chosen:
        raise SystemExit(f"error: no job matches {patterns}; job names look like {all_jobs()[0].name}")
    return chosen


def all_jobs() -> list[Job]:
    """In the order that fills the table soonest."""
    return ([Job("icl", "gemma3_270m", task, SEEDS[0]) for task in TASKS]
            + [Job("uft", "gemma3_270m", task, SEEDS[0]) for task in TASKS]
            + [Job("icl", "gemma3_270m", "mmlu", SEEDS[0])]
            + [Job("icl", "smollm2_135m", task, SEEDS[0]) for task in NEGATIVE_CONTROL_TASKS]
            + [Job("uft", "gemma3_270m", task, seed) for seed in SEEDS[1:] for task in TASKS]
            + [Job("icl", "gemma3_270m", task, seed) for seed in SEEDS[1:] for task in TASKS]
            + [Job("icl", "gemma3_270m", "gsm8k", SEEDS[0])])


# ------------------------------------------------------------------------------------ figures
def best_by_reward(history: list[dict]) -> dict:
    """The evaluation a user without labels would keep: the highest mean reward of the argmax labels
    over the steps before it (the reward is label-free; the accuracy is read only to report it)."""
    return max((h for h in history if h.get("reward_argmax") is not None), key=lambda h: h["reward_argmax"])


def figures(job: Job, result: dict) -> dict:
    """The percentages a table row needs from one run's results.json."""
    if job.kind == "uft":
        best = best_by_reward(result["history"])
        return {"zero_shot": 100 * result["zero_shot"]["test_accuracy"],
                "uft_final": 100 * result["final"]["test_accuracy"],
                "uft_best_by_reward": 100 * best["test_accuracy"], "uft_best_step": best["step"],
                "num_test": result["num_test"],
                # a resumed run's seconds are its last invocation's; its training steps' span every invocation
                "seconds": max(result["timing"]["seconds"], result["timing"]["train_seconds"])}
    if job.task == "mmlu":
        stages = result["macro"]
        rounds = {int(s.split("_")[1]): 100 * a for s, a in stages.items() if s.startswith("round_")}
        return {"zero_shot": 100 * stages["zero_shot"], "supervised_icl": 100 * stages["supervised_icl"],
                "rounds": [rounds[t] for t in sorted(rounds)], "num_test": result["num_test"],
                "subjects": result["num_subjects"], "seconds": result["timing"]["seconds"]}
    last = result["rounds"][-1]
    if job.task == "gsm8k":  # generation: accuracy over all questions, unanswered ones wrong
        return {"zero_shot": 100 * result["zero_shot"]["test_accuracy"],
                "supervised_icl": 100 * result["supervised_icl"]["test_accuracy"],
                "rounds": [100 * r["test_accuracy"] for r in result["rounds"]],
                "num_test": result["num_test"], "seconds": result["timing"]["seconds"]}
    return {"zero_shot": 100 * result["zero_shot"]["test_accuracy"],
            "supervised_icl": 100 * result["supervised_icl"]["test_accuracy"],
            "rounds": [100 * r["test_accuracy"] for r in result["rounds"]],
            "last_round_diagnostics": last.get("diagnostics"), "labels": result["settings"]["labels"],
            "num_test": result["num_test"], "seconds": result["timing"]["seconds"]}


def collect(root: Path) -> dict:
    """Every finished job's figures, by job name."""
    found = {}
    for job in all_jobs():
        path = root / job.name / "results.json"
        if path.exists():
            found[job.name] = {"kind": job.kind, "model": job.model, "task": job.task, "seed": job.seed,
                               **figures(job, json.loads(path.read_text()))}
    return found


def spread(values: list[float]) -> str:
    """mean ± std over seeds, and how many seeds."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f} (1 seed)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def described(diagnostics: dict) -> str:
    """A last round's label-free diagnostics: labels flipped, vote agreement, predicted class shares."""
    classes = "/".join(f"{100 * share:.0f}" for share in diagnostics["class_distribution"])
    return f"{100 * diagnostics['flip_fraction']:.0f}%, {100 * diagnostics['vote_agreement']:.0f}%, {classes}"


def markdown(runs: dict) -> str:
    """Per (model, task): zero-shot, supervised ICL, best and final UICL round, UFT, last round's diagnostics."""
    lines = [("| model | task | test n | zero-shot | supervised ICL | UICL best round | UICL final round | "
              "UFT final | UFT best by reward | last round: flipped, agreement, classes (per seed) | seeds |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, model_name in MODELS.items():
        for task in [*TASKS, "mmlu", "gsm8k"]:
            icl = [r for r in runs.values() if r["kind"] == "icl" and r["model"] == model and r["task"] == task]
            uft = [r for r in runs.values() if r["kind"] == "uft" and r["model"] == model and r["task"] == task]
            if not icl and not uft:
                continue
            first = (icl or uft)[0]
            diagnostics = "; ".join(described(r["last_round_diagnostics"]) for r in icl
                                    if r.get("last_round_diagnostics"))
            seeds = "; ".join(f"{kind} {','.join(str(r['seed']) for r in runs_of)}"
                              for kind, runs_of in (("icl", icl), ("uft", uft)) if runs_of)
            lines.append("| " + " | ".join([
                model_name, task + (f" ({first['subjects']} subjects)" if task == "mmlu" else ""),
                str(first["num_test"]), spread([r["zero_shot"] for r in icl or uft]),
                spread([r["supervised_icl"] for r in icl]), spread([max(r["rounds"]) for r in icl]),
                spread([r["rounds"][-1] for r in icl]), spread([r["uft_final"] for r in uft]),
                spread([r["uft_best_by_reward"] for r in uft]), diagnostics, seeds]) + " |")
    return "\n".join(lines) + "\n"


def machine_facts() -> dict:
    """What the figures were measured on."""
    import torch

    from joint_inference.models.language import cpu_has_bf16_matmul

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cpu_bf16_matmul": cpu_has_bf16_matmul()}


def write(runs: dict, out: Path, started: float) -> None:
    machine = machine_facts()
    report = {"settings": {**SETTINGS, "tasks": TASKS, "mmlu_subjects": MMLU_SUBJECTS, "seeds": SEEDS,
                           "local_splits": LOCAL_SPLITS, "dataset.sample_seed": 42},
              "machine": machine, "seconds_this_invocation": time.time() - started,
              "seconds_all_runs": sum(r["seconds"] for r in runs.values()),
              "jobs_done": len(runs), "jobs_total": len(all_jobs()), "runs": runs}
    atomic_write_json(out, report)
    atomic_write_text(out.with_suffix(".md"), markdown(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "laptop_table1", help="run directories")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "laptop_table1.json")
    parser.add_argument("--collect", action="store_true", help="only write the table from the finished runs")
    parser.add_argument("--only", nargs="+", default=[], metavar="PATTERN",
                        help="run only the jobs matching these globs, in this order (e.g. 'icl/*/sst2/*')")
    args = parser.parse_args()
    started = time.time()
    if not args.collect:
        jobs = selected_jobs(args.only)
        for i, job in enumerate(jobs, 1):
            if (args.root / job.name / "results.json").exists():
                continue
            print(f"[{i}/{len(jobs)}] {job.name}", flush=True)
            (args.root / job.name).mkdir(parents=True, exist_ok=True)
            with open(args.root / job.name / "job.log", "a") as log:
                done = subprocess.run(job.command(args.root), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                      check=False)
            if done.returncode:
                print(f"  failed (exit {done.returncode}); see {args.root / job.name / 'job.log'}", flush=True)
            write(collect(args.root), args.out, started)
    runs = collect(args.root)
    write(runs, args.out, started)
    print(markdown(runs))


if __name__ == "__main__":
    main()
