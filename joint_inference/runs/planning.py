"""How big a run is before it runs: prompts and tokens per stage, the wall time, and what an API run costs.

``dry_run=true`` loads the data and the tokenizer (never the weights), counts the prompts and the
tokens that the model would run through at each stage (zero-shot, the supervised baseline, each
round), estimates the wall time from the throughput measured in ``benchmarks/*.json`` for the
same model and device, prints it all and stops, having written nothing.

Counting rule (what the scorer runs): a zero-shot prompt is BOS + the query's text before its
label. An N-shot prompt is BOS + N demonstrations (text, label, text after the label, separator)
+ the query's text before its label. The demonstrations of a round depend on labels not predicted
yet, so an ICL stage's tokens are their expectation under class-balanced draws: N times the pool's
mean demonstration length, the label's length averaged over the label set. With shared
demonstrations (``support_sampling=shared``) a block's demonstrations run once per vote and each
query adds only its own tokens. In ``exact`` mode every prompt runs once for the one-token labels and once
more per multi-token label (per label where each example has its own choices, as lm-eval tasks do), whole
(shared demonstrations are not cached then). The estimate divides the tokens by the benchmark's tokens per
second of the batched scorer.

The same estimate guards CPU runs: on a CPU a run estimated at more than an hour stops before the
model loads, with the estimate, the quickstart command and ``allow_long_cpu_run=true`` to run it
anyway (README, "Quickstart"). Fine-tuning is counted and guarded alike (:func:`finetuning_plan`).

A run behind an API (``backend=openai``) goes through whole in a temporary directory with clients that
count instead of sending (:func:`api_dry_run`, :class:`~joint_inference.api.client.DryRunClient`):
zero-shot and baseline prompts are the real ones; the rounds' demonstrations are drawn from stand-in
answers (classification: uniform label scores; generation: a stand-in response of
``api.dry_run_output_tokens`` tokens that states an answer), so their prompt tokens are estimates.
Requests already in the run's cache are counted apart (a rerun does not pay for them). Prompt tokens are
exact for classification (the token ids sent), counted with the model's tokenizer where it loads, else
about 4 characters a token; images count ``model.tokens_per_image`` (85: GPT-4o at ``detail: low``).
Output tokens: 1 per classification request; for generation the estimate and the bound (``max_new_tokens``
per response). Nothing is written to the run directory; the summary is printed and returned.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..api import capabilities
from ..api.client import DryRunTally, cost
from ..core.errors import ConfigError
from ..core.settings import FTSettings, ICLSettings, TextICLSettings
from ..data.files import labelled
from ..data.hub import TaskData
from ..data.tasks import modality
from ..models.language import compute_dtype
from ..prompts.templates import ChoiceEncoder, PromptEncoder
from ..scoring.scorer import resolve_label_mode

log = logging.getLogger(__name__)
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
LONG_CPU_RUN_SECONDS = 3600  # a CPU run estimated longer than this needs allow_long_cpu_run=true
QUICKSTART = "python unsupervised_icl_llm.py +experiment=quickstart"


# ------------------------------------------------------------------------------- throughput
def benchmarks_of(model_name: str, device_type: str, directory: Path = BENCHMARKS):
    """(path, figures) of each readable benchmark JSON in ``directory`` measured for ``model_name`` on ``device_type``."""
    for path in sorted(directory.glob("*.json")):
        try:
            figures = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(figures, dict) and figures.get("model") == model_name and figures.get("device") == device_type:
            yield path, figures


def throughput(model_name: str, device_type: str, dtype: str, n: int, directory: Path = BENCHMARKS) -> dict | None:
    """The batched scorer's measured tokens per second for ``model_name`` on ``device_type``: from the
    benchmark of that model and device whose N is nearest ``n`` (``dtype`` bfloat16: its bf16 run,
    when it has one). None when no benchmark matches."""
    found = [(abs(figures.get("N", n) - n), path, figures)
             for path, figures in benchmarks_of(model_name, device_type, directory)
             if figures.get("num_tokens") and figures.get("batched_seconds")]
    if not found:
        return None
    _, path, figures = min(found, key=lambda f: f[0])
    seconds, precision = figures["batched_seconds"], "float32"
    low = (figures.get("naive_vs_lower_precision") or {}).get(dtype)
    if dtype != "float32" and low and low.get("batched_seconds"):
        seconds, precision = low["batched_seconds"], dtype
    machine = figures.get("machine") or {}
    return {"tokens_per_s": figures["num_tokens"] / seconds, "benchmark": f"benchmarks/{path.name}",
            "N": figures.get("N"), "dtype": precision, "cpu_count": machine.get("cpu_count"),
            "gpu": machine.get("gpu")}


def run_dtype(run, device) -> str:
    """The dtype the run will compute in (in this process): what its estimates are read for."""
    return compute_dtype(run.model, "hf", device)


def model_throughput(run, device) -> dict | None:
    return throughput(run.model.name, device.type, run_dtype(run, device), run.N)


def model_step_seconds(run, device) -> dict | None:
    return step_seconds(run.model.name, device.type, run_dtype(run, device))


# ------------------------------------------------------------------------------------ counts
def classification_plan(run: ICLSettings, data: TaskData, encoder: PromptEncoder) -> list[dict]:
    """[{stage, prompts, tokens}] of a classification run (the counting rule of this module's docstring)."""

    encoded = encoder.encode_splits(data)
    splits, pool_split = (("test",), "test") if data.transductive else (("test", "train"), "train")
    bos, separator = len(encoder.bos), len(encoder.separator)
    label_tokens = float(np.mean([len(ids) for ids in encoder.label_ids]))
    exact = resolve_label_mode(run.label_mode, encoder.label_ids, encoder.label_names) == "exact"
    passes = forward_passes(encoder) if exact else 1
    shared = run.support_sampling == "shared" and not exact  # exact scores whole prompts

    def demonstration_tokens(pool) -> float:
        return float(np.mean([len(ex.prefix) + len(ex.suffix) for ex in pool])) + label_tokens + separator

    def zero_shot(queries) -> tuple[int, float]:
        return len(queries), passes * float(sum(bos + len(q.prefix) for q in queries))

    def icl(queries, pool) -> tuple[int, float]:
        context = bos + run.N * demonstration_tokens(pool)
        own = sum(len(q.prefix) for q in queries)
        runs = -(-len(queries) // run.block_size) if shared else len(queries)  # demonstration sets run per vote
        return run.num_repeats * len(queries), passes * run.num_repeats * (runs * context + own)

    def stage(name, counts):
        return {"stage": name, "prompts": sum(p for p, _ in counts), "tokens": round(sum(t for _, t in counts))}

    stages = [stage("zero-shot", [zero_shot(encoded[s]) for s in splits])]
    if run.supervised_icl and labelled(data):
        pool = encoded[pool_split] if data.supervised_pool is None else encoder.encode_all(data.supervised_pool)
        stages.append(stage("supervised ICL (baseline)", [icl(encoded["test"], pool)]))
    for t in range(1, run.T + 1):
        stages.append(stage(f"round {t}", [icl(encoded[s], encoded[pool_split]) for s in splits]))
    if "random_labels" in run.controls:  # batch_calibrated reads the zero-shot scores: no prompts of its own
        stages.append(stage("control: random labels", [icl(encoded["test"], encoded[pool_split])]))
    return stages


def forward_passes(encoder: PromptEncoder) -> int:
    """Forward passes over each prompt in ``exact`` mode (``Scorer._exact_scores``): one for the one-token labels
    together, one per multi-token label; one per label where each example has its own choices."""
    if isinstance(encoder, ChoiceEncoder):
        return encoder.num_labels
    multi = sum(len(ids) > 1 for ids in encoder.label_ids)
    return multi + (multi < encoder.num_labels)


def plan_summary(run, stages: list[dict], device) -> dict:
    """The stages, their total, and the wall-time estimate (None when no benchmark matches)."""
    total = {"stage": "total", "prompts": sum(s["prompts"] for s in stages), "tokens": sum(s["tokens"] for s in stages)}
    speed = model_throughput(run, device)
    seconds = None if speed is None else total["tokens"] / speed["tokens_per_s"]
    return {"stages": stages, "total": total, "estimate_seconds": seconds, "throughput": speed,
            "model": run.model.name, "device": device.type}


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_line(plan: dict) -> str:
    speed = plan["throughput"]
    if speed is None:
        return (f"no estimate of the wall time: benchmarks/ holds no measured throughput for {plan['model']} on "
                f"{plan['device']} (scripts/bench_scoring.py measures one)")
    where = (f"{speed['cpu_count']}-core CPU" if plan["device"] == "cpu" and speed["cpu_count"] else
             speed["gpu"] or plan["device"])
    return (f"estimated wall time: {duration(plan['estimate_seconds'])} at {speed['tokens_per_s']:.0f} tokens/s, the "
            f"batched scorer's throughput measured for {plan['model']} ({speed['dtype']}) on a {where} "
            f"({speed['benchmark']}); scaled by tokens, model loading not counted")


def format_plan(title: str, plan: dict) -> str:
    rows = [*plan["stages"], plan["total"]]
    width = max(len(r["stage"]) for r in rows) + 2
    lines = [title, f"  {'stage':<{width}}{'prompts':>12}{'tokens':>14}"]
    lines += [f"  {r['stage']:<{width}}{r['prompts']:>12,}{r['tokens']:>14,}" for r in rows]
    return "\n".join(lines + ["  " + estimate_line(plan)]) + "\n"


# ------------------------------------------------------------------------------ fine-tuning
UFT_QUICK = ("python unsupervised_ft_llm.py dataset.num_examples=300 batch_size=4 N=4 num_iterations=30 eval_freq=10 "
             "device=cpu")


def step_seconds(model_name: str, device_type: str, dtype: str, directory: Path = BENCHMARKS) -> dict | None:
    """A fine-tuning step's measured seconds (scripts/bench_uft.py) for ``model_name`` on ``device_type``, in
    ``dtype`` where a benchmark measured it (one without a dtype measured fp32), else in any."""
    found = [(figures.get("dtype", "float32") != dtype, path.name, path, figures)
             for path, figures in benchmarks_of(model_name, device_type, directory)
             if figures.get("seconds_per_step") and figures.get("B") and figures.get("N")]
    if not found:
        return None
    _, _, path, figures = min(found, key=lambda f: f[:2])
    return {"seconds_per_step": figures["seconds_per_step"], "examples_per_step": figures["B"] * figures["N"],
            "benchmark": f"benchmarks/{path.name}", "dtype": figures.get("dtype", "float32"),
            "cpu_count": (figures.get("machine") or {}).get("cpu_count")}


def finetuning_plan(run, data, encoder, device) -> dict:
    """Steps, evaluations, prompts and tokens of a fine-tuning run, and its wall time scaled from the
    benchmark's seconds per step by the examples per step (None when no benchmark matches)."""
    encoded = encoder.encode_splits(data)
    b, n, steps = run.batch_size, run.N, run.num_iterations
    bos, separator = len(encoder.bos), len(encoder.separator)
    label_tokens = float(np.mean([len(ids) for ids in encoder.label_ids]))
    pool = encoded["train"]
    alone = float(np.mean([bos + len(ex.prefix) for ex in pool]))  # a task-encoder prompt: one example
    labelled = float(np.mean([len(ex.prefix) + len(ex.suffix) for ex in pool])) + label_tokens + separator
    evaluations = steps // run.eval_freq + (steps % run.eval_freq != 0) + 1  # step 0, every eval_freq, the last
    test_tokens = sum(bos + len(ex.prefix) for ex in encoded["test"])
    stages = [{"stage": "evaluations (zero-shot + every eval_freq)", "prompts": evaluations * len(encoded["test"]),
               "tokens": evaluations * test_tokens},
              {"stage": f"training: {steps} steps x (B*N task-encoder prompts + 2B reward sequences)",
               "prompts": steps * (b * n + 2 * b),
               "tokens": round(steps * (b * n * alone + 2 * b * (bos + n * labelled)))}]
    trainings = 1 + ("random_labels" in run.controls)  # the control trains again, evaluated as often
    if trainings > 1:
        stages.append({**stages[0], "stage": "control: random labels, the same evaluations"})
        stages.append({**stages[1], "stage": "control: random labels, the same training"})
    total = {"stage": "total", "prompts": sum(s["prompts"] for s in stages), "tokens": sum(s["tokens"] for s in stages)}
    speed = model_step_seconds(run, device)
    seconds = (None if speed is None else
               trainings * steps * speed["seconds_per_step"] * b * n / speed["examples_per_step"])
    return {"stages": stages, "total": total, "estimate_seconds": seconds, "step_benchmark": speed, "throughput": None,
            "model": run.model.name, "device": device.type}


def finetuning_estimate_line(plan: dict) -> str:
    speed = plan["step_benchmark"]
    if speed is None:
        return (f"no estimate of the wall time: benchmarks/ holds no fine-tuning step time for {plan['model']} on "
                f"{plan['device']} (scripts/bench_uft.py measures one)")
    return (f"estimated wall time: {duration(plan['estimate_seconds'])}, the {speed['seconds_per_step']:.1f} s per "
            "step "
            f"of {speed['examples_per_step']} examples measured for {plan['model']} ({speed['dtype']}) on a "
            f"{speed['cpu_count']}-core CPU ({speed['benchmark']}) scaled by the examples per step; evaluations and "
            "model loading not counted")


# ------------------------------------------------------------------------------- the guard
def check_size(run: ICLSettings | FTSettings, data: TaskData, text_encoder: Callable[[], PromptEncoder | None],
               device) -> dict | None:
    """The one check of a run's size, before the model loads: the counts of :func:`classification_plan` or
    :func:`finetuning_plan` and the wall time they take at the measured throughput. ``dry_run=true``: print
    them and return ``{"dry_run": plan}`` (the caller stops there). On a CPU, without
    ``allow_long_cpu_run=true``: a run estimated at more than an hour is a ConfigError that gives the
    estimate, a command for a run of minutes and how to run it anyway. Returns None when the run goes on.
    ``text_encoder()``: the run's prompt encoder, built where it is needed (None for image tasks, which have
    no dry run); its labels are checked as the scorer checks them (labels that the tokenizer cannot tell apart
    are an error here already)."""
    finetuning = isinstance(run, FTSettings)
    guard = device.type == "cpu" and not run.allow_long_cpu_run
    measured = (model_step_seconds(run, device) if finetuning else
                None if run.backend == "openai" else model_throughput(run, device))  # a server's speed is not ours
    if not run.dry_run and not (guard and measured is not None):
        return None
    if modality(run.dataset) != "text":
        if run.dry_run:
            raise ConfigError("dry_run=true counts the prompts of text tasks; image tasks have no dry run yet")
        return None
    encoder = text_encoder()
    resolve_label_mode(run.label_mode, encoder.label_ids, encoder.label_names)
    if finetuning:
        plan = finetuning_plan(run, data, encoder, device)
        text = finetuning_plan_text(run, data, plan, device)
    else:
        plan = plan_summary(run, classification_plan(run, data, encoder), device)
        text = format_plan(plan_title(run, data, device), plan)
    if run.dry_run:
        print(text, flush=True)
        return {"dry_run": plan}
    seconds = plan["estimate_seconds"]
    if seconds is not None and seconds > LONG_CPU_RUN_SECONDS:
        raise ConfigError(finetuning_too_long(run, plan, seconds) if finetuning else too_long(run, data, plan, seconds))
    if seconds is not None and not finetuning:
        log.info("%s", estimate_line(plan))
    return None


def examples_text(data: TaskData) -> str:
    return (f"{len(data.test)} examples (each a query and a pool example)" if data.transductive
            else f"{len(data.train)} unlabelled + {len(data.test)} test examples")


def plan_title(run: ICLSettings, data: TaskData, device) -> str:
    return (f"dry run of {run.dataset.name} / {run.model.name} on {device}: {examples_text(data)}; N={run.N}, "
            f"T={run.T}, {run.num_repeats} votes, {run.support_sampling} demonstrations. Nothing was scored or written.")


def too_long(run: ICLSettings, data: TaskData, plan: dict, seconds: float) -> str:
    speed = plan["throughput"]
    cpu = f"{speed['cpu_count']}-core CPU" if speed["cpu_count"] else "CPU"
    return (f"this run would take about {duration(seconds)} on a CPU ({plan['total']['prompts']:,} prompts, "
            f"{plan['total']['tokens']:,} tokens at the {speed['tokens_per_s']:.0f} tokens/s measured for "
            f"{run.model.name} on a {cpu} in {speed['benchmark']}; this run: {examples_text(data)}, N={run.N}, "
            f"T={run.T}, {run.num_repeats} votes). The defaults (N=16, T=8, 5 votes, 3,000 examples) are the paper's "
            f"GPU setting. For a run of minutes: {QUICKSTART} (300 examples, N=8, T=2, 3 votes: about 10 min), or "
            "lower dataset.num_examples, N, T or num_repeats; dry_run=true prints the counts and the estimate. To run "
            "it on this CPU anyway: allow_long_cpu_run=true")


def finetuning_plan_text(run: FTSettings, data: TaskData, plan: dict, device) -> str:
    rows = [*plan["stages"], plan["total"]]
    width = max(len(r["stage"]) for r in rows) + 2
    return "\n".join([f"dry run of fine-tuning {run.dataset.name} / {run.model.name} on {device}: "
                      f"{len(data.train)} pool / {len(data.test)} test examples, B={run.batch_size}, N={run.N}, "
                      f"{run.num_iterations} steps. Nothing was trained or written.",
                      f"  {'stage':<{width}}{'prompts':>12}{'tokens':>14}"]
                     + [f"  {r['stage']:<{width}}{r['prompts']:>12,}{r['tokens']:>14,}" for r in rows]
                     + ["  " + finetuning_estimate_line(plan)])


def finetuning_too_long(run: FTSettings, plan: dict, seconds: float) -> str:
    return (f"this fine-tuning run would take about {duration(seconds)} on a CPU like the benchmark's "
            f"({run.num_iterations} steps of B={run.batch_size} x N={run.N} examples; "
            f"{plan['step_benchmark']['benchmark']}). The defaults are the paper's GPU setting. For a run of minutes: "
            f"{UFT_QUICK}; dry_run=true prints the counts and the estimate. To run it on this CPU anyway: "
            "allow_long_cpu_run=true")


def subjects_plan(run: ICLSettings, subjects: list[TaskData], encoder: PromptEncoder, device) -> dict:
    """``dry_run=true`` over every subject of an all-subjects run (MMLU): each subject's counts summed."""
    resolve_label_mode(run.label_mode, encoder.label_ids, encoder.label_names)
    totals: dict[str, dict] = {}
    for data in subjects:
        for stage in classification_plan(run, data, encoder):
            into = totals.setdefault(stage["stage"], {"stage": stage["stage"], "prompts": 0, "tokens": 0})
            into["prompts"] += stage["prompts"]
            into["tokens"] += stage["tokens"]
    plan = plan_summary(run, list(totals.values()), device)
    print(format_plan(f"dry run of {run.dataset.name} ({len(subjects)} subjects) / {run.model.name} on "
                      f"{device}: N={run.N}, T={run.T}, {run.num_repeats} votes. Nothing was scored or written.", plan),
          flush=True)
    return {"dry_run": plan}


# ------------------------------------------------------------------------------ behind an API
def api_dry_run(run: TextICLSettings, counting_run: Callable[[TextICLSettings, DryRunTally], dict]) -> dict:
    """Count the requests of ``counting_run(settings, tally)`` (the run, its API clients counting into ``tally``,
    in a temporary directory) with nothing sent; print and return the tally and the cost."""
    api = run.api
    cache_dir = api.cache_dir or str(Path(run.output_dir) / "api_cache")
    tally = DryRunTally()
    quiet = logging.getLogger("joint_inference")
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="joint_inference_dry_run.") as tmp:
        # allow_long_cpu_run: the CPU guard estimates local scoring; nothing runs locally here
        counted = replace(run, dry_run=False, output_dir=tmp, progress=False, allow_long_cpu_run=True,
                          api=replace(api, cache_dir=cache_dir))
        quiet.setLevel(logging.WARNING)  # the stages' accuracies of stand-in answers mean nothing
        try:
            counting_run(counted, tally)
        finally:
            quiet.setLevel(level)
    m = run.model
    price_in, price_out = m.price_per_million_input_tokens, m.price_per_million_output_tokens
    rate = server_rate(run, cache_dir)
    summary = {**tally.__dict__, "base_url": m.base_url, "model": m.name,
               "cost_usd": cost(tally.prompt_tokens, tally.output_tokens, price_in, price_out),
               "max_cost_usd": cost(tally.prompt_tokens, tally.max_output_tokens, price_in, price_out),
               "requests_per_second": rate and rate[0],
               "estimate_seconds": tally.requests / rate[0] if rate else None}
    print(summary_text(summary, cache_dir, price_in, price_out, api.dry_run_output_tokens, rate and rate[1]))
    return summary


def server_rate(run: TextICLSettings, cache_dir: str) -> tuple[float, str] | None:
    """(requests a second, where that was measured) for the run's server: the run directory's api_usage.json
    (requests answered per second with requests in flight), else the capability probe's one-at-a-time requests;
    None when neither has been measured."""
    try:
        usage = json.loads((Path(run.output_dir) / "api_usage.json").read_text())
        if usage.get("server") == run.model.base_url and usage.get("requests_per_second"):
            return float(usage["requests_per_second"]), "measured by the earlier runs in this directory (api_usage.json)"
    except (OSError, ValueError, TypeError):
        pass
    try:
        kept = json.loads((Path(cache_dir) / capabilities.FILE).read_text())
        caps = kept.get(capabilities.key(str(run.model.base_url), run.model.name, run.model.endpoint)) or {}
        if caps.get("seconds_per_request"):
            return 1 / caps["seconds_per_request"], "one request at a time when the server was probed (a lower bound)"
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    return None


def summary_text(s: dict, cache_dir: str, price_in, price_out, output_tokens: int, rate_source: str | None = None) -> str:
    lines = [f"dry run, nothing sent: {s['requests']:,} requests to {s['base_url']} (model {s['model']})"
             + (f"; {s['cached']:,} more are already cached in {cache_dir}" if s["cached"] else "")
             + (f"; {s['duplicates']:,} repeat a request of their batch (sent once)" if s["duplicates"] else ""),
             f"  prompt tokens:  {s['prompt_tokens']:,}",
             (f"  output tokens:  ~{s['output_tokens']:,} (responses of ~{output_tokens} tokens: "
              f"api.dry_run_output_tokens), at most {s['max_output_tokens']:,}")]
    if s["unprobed"]:
        lines.append("  counted as one top-log-prob read a prompt: the server was not asked what it can do (a dry "
                     "run sends nothing); where reads miss a label, a run asks again, and a server that echoes "
                     "prompt log-probs gets one request a label for those")
    if s["estimate_seconds"] is not None:
        lines.append(f"  time: ~{duration(s['estimate_seconds'])} at {s['requests_per_second']:.2f} requests/s, "
                     f"{rate_source}")
    if s["cost_usd"] is None:
        lines.append("  cost: set model.price_per_million_input_tokens and model.price_per_million_output_tokens")
    else:
        lines.append(f"  cost at ${price_in}/M input and ${price_out}/M output tokens: ~${s['cost_usd']:,.2f} "
                     f"(at most ${s['max_cost_usd']:,.2f})")
    return "\n".join(lines)
