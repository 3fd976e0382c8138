"""How big a classification run is before it runs: prompts and tokens per stage, and the wall time.

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
query adds only its own tokens. The estimate divides the tokens by the benchmark's tokens per
second of the batched scorer.

The same estimate guards CPU runs: on a CPU a run estimated at more than an hour stops before the
model loads, with the estimate, the quickstart command and ``allow_long_cpu_run=true`` to run it
anyway (README, "Quickstart").
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError

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


def model_throughput(cfg, device) -> dict | None:
    from ..models.language import resolve_dtype

    dtype = str(resolve_dtype(cfg.model.dtype, device)).replace("torch.", "")
    return throughput(cfg.model.name, device.type, dtype, cfg.N)


# ------------------------------------------------------------------------------- tokenizer
def dry_run_tokenizer(model_cfg):
    """The model's tokenizer without its weights: a random model's trained tokenizer, an embedded
    model's from its converted snapshot or straight from the GGUF file (no conversion), else
    :func:`~joint_inference.models.language.load_tokenizer`."""
    from transformers import AutoTokenizer

    from ..models.language import EMBEDDED, cache_dir, load_tokenizer

    if model_cfg.random_init:
        from ..models.tiny import tiny_tokenizer

        return tiny_tokenizer(**model_cfg.random_init)
    name = model_cfg.embedded
    if not name:
        return load_tokenizer(model_cfg)
    if name not in EMBEDDED:
        raise ConfigError(f"unknown embedded model {name!r}; valid: {', '.join(EMBEDDED)}")
    snapshot = cache_dir() / "models" / name
    if (snapshot / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(snapshot)
    else:
        locate, install = EMBEDDED[name]
        try:
            gguf = locate()
        except ModuleNotFoundError:
            raise ConfigError(f"embedded model {name!r} is not installed: {install}") from None
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prompt_encoder(cfg, tokenizer):
    """The run's prompt encoder, with the label set checked as the scorer checks it (labels that the
    tokenizer cannot tell apart are an error here already)."""
    from ..prompts.encoders import build_prompt_encoder
    from ..scoring.scorer import resolve_label_mode

    encoder = build_prompt_encoder(cfg, tokenizer)
    resolve_label_mode(cfg.label_mode, encoder.label_ids, encoder.label_names)
    return encoder


# ------------------------------------------------------------------------------------ counts
def classification_plan(cfg, data, encoder) -> list[dict]:
    """[{stage, prompts, tokens}] of a classification run (the counting rule of this module's docstring)."""
    from ..data.files import labelled

    encoded = encoder.encode_splits(data)
    splits, pool_split = (("test",), "test") if data.transductive else (("test", "train"), "train")
    bos, separator = len(encoder.bos), len(encoder.separator)
    label_tokens = float(np.mean([len(ids) for ids in encoder.label_ids]))
    shared = cfg.support_sampling == "shared"

    def demonstration_tokens(pool) -> float:
        return float(np.mean([len(ex.prefix) + len(ex.suffix) for ex in pool])) + label_tokens + separator

    def zero_shot(queries) -> tuple[int, float]:
        return len(queries), float(sum(bos + len(q.prefix) for q in queries))

    def icl(queries, pool) -> tuple[int, float]:
        context = bos + cfg.N * demonstration_tokens(pool)
        own = sum(len(q.prefix) for q in queries)
        runs = -(-len(queries) // cfg.block_size) if shared else len(queries)  # demonstration sets run per vote
        return cfg.num_repeats * len(queries), cfg.num_repeats * (runs * context + own)

    def stage(name, counts):
        return {"stage": name, "prompts": sum(p for p, _ in counts), "tokens": round(sum(t for _, t in counts))}

    stages = [stage("zero-shot", [zero_shot(encoded[s]) for s in splits])]
    if cfg.supervised_icl and labelled(data):
        pool = encoded[pool_split] if data.supervised_pool is None else encoder.encode_all(data.supervised_pool)
        stages.append(stage("supervised ICL (baseline)", [icl(encoded["test"], pool)]))
    for t in range(1, cfg.T + 1):
        stages.append(stage(f"round {t}", [icl(encoded[s], encoded[pool_split]) for s in splits]))
    return stages


def plan_summary(cfg, stages: list[dict], device) -> dict:
    """The stages, their total, and the wall-time estimate (None when no benchmark matches)."""
    total = {"stage": "total", "prompts": sum(s["prompts"] for s in stages), "tokens": sum(s["tokens"] for s in stages)}
    speed = model_throughput(cfg, device)
    seconds = None if speed is None else total["tokens"] / speed["tokens_per_s"]
    return {"stages": stages, "total": total, "estimate_seconds": seconds, "throughput": speed,
            "model": cfg.model.name, "device": device.type}


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


# ------------------------------------------------------------------------------- the checks
def check_run_size(cfg, data, device) -> dict | None:
    """Before the model loads. ``dry_run=true``: print the counts and the estimate, and return them as
    ``{"dry_run": plan}`` (the caller stops there). On a CPU, without ``allow_long_cpu_run=true``: a run
    estimated at more than an hour is a ConfigError that gives the estimate, the quickstart and how to
    run it anyway. Returns None when the run goes on."""
    from ..data.tasks import modality

    dry = cfg.dry_run
    guard = device.type == "cpu" and not cfg.allow_long_cpu_run
    if not dry and not (guard and model_throughput(cfg, device) is not None):
        return None
    if modality(cfg) != "text":
        if dry:
            raise ConfigError("dry_run=true counts the prompts of text tasks; image tasks have no dry run yet")
        return None
    plan = plan_summary(cfg, classification_plan(cfg, data, prompt_encoder(cfg, dry_run_tokenizer(cfg.model))), device)
    examples = (f"{len(data.test)} examples (each a query and a pool example)" if data.transductive
                else f"{len(data.train)} unlabelled + {len(data.test)} test examples")
    title = (f"dry run of {cfg.dataset.name} / {cfg.model.name} on {device}: {examples}; N={cfg.N}, T={cfg.T}, "
             f"{cfg.num_repeats} votes, {cfg.support_sampling} demonstrations. Nothing was scored or written.")
    if dry:
        print(format_plan(title, plan), flush=True)
        return {"dry_run": plan}
    seconds = plan["estimate_seconds"]
    if seconds is not None and seconds > LONG_CPU_RUN_SECONDS:
        speed = plan["throughput"]
        cpu = f"{speed['cpu_count']}-core CPU" if speed["cpu_count"] else "CPU"
        raise ConfigError(
            f"this run would take about {duration(seconds)} on a CPU ({plan['total']['prompts']:,} prompts, "
            f"{plan['total']['tokens']:,} tokens at the {speed['tokens_per_s']:.0f} tokens/s measured for "
            f"{cfg.model.name} on a {cpu} in {speed['benchmark']}; this run: {examples}, N={cfg.N}, "
            f"T={cfg.T}, {cfg.num_repeats} votes). The defaults (N=16, T=8, 5 votes, 3,000 examples) are the paper's "
            f"GPU setting. For a run of minutes: {QUICKSTART} (300 examples, N=8, T=2, 3 votes: about 10 min), or "
            "lower dataset.num_examples, N, T or num_repeats; dry_run=true prints the counts and the estimate. To run "
            "it on this CPU anyway: allow_long_cpu_run=true")
    if seconds is not None:
        log.info("%s", estimate_line(plan))
    return None


# ------------------------------------------------------------------------------ fine-tuning
UFT_QUICK = ("python unsupervised_ft_llm.py dataset.num_examples=300 batch_size=4 N=4 num_iterations=30 eval_freq=10 "
             "device=cpu")


def step_seconds(model_name: str, device_type: str, directory: Path = BENCHMARKS) -> dict | None:
    """A fine-tuning step's measured seconds (scripts/bench_uft.py) for ``model_name`` on ``device_type``."""
    for path, figures in benchmarks_of(model_name, device_type, directory):
        if figures.get("seconds_per_step") and figures.get("B") and figures.get("N"):
            return {"seconds_per_step": figures["seconds_per_step"], "examples_per_step": figures["B"] * figures["N"],
                    "benchmark": f"benchmarks/{path.name}",
                    "cpu_count": (figures.get("machine") or {}).get("cpu_count")}
    return None


def finetuning_plan(cfg, data, encoder, device) -> dict:
    """Steps, evaluations, prompts and tokens of a fine-tuning run, and its wall time scaled from the
    benchmark's seconds per step by the examples per step (None when no benchmark matches)."""
    encoded = encoder.encode_splits(data)
    b, n, steps = cfg.batch_size, cfg.N, cfg.num_iterations
    bos, separator = len(encoder.bos), len(encoder.separator)
    label_tokens = float(np.mean([len(ids) for ids in encoder.label_ids]))
    pool = encoded["train"]
    alone = float(np.mean([bos + len(ex.prefix) for ex in pool]))  # a task-encoder prompt: one example
    labelled = float(np.mean([len(ex.prefix) + len(ex.suffix) for ex in pool])) + label_tokens + separator
    evaluations = steps // cfg.eval_freq + (steps % cfg.eval_freq != 0) + 1  # step 0, every eval_freq, the last
    test_tokens = sum(bos + len(ex.prefix) for ex in encoded["test"])
    stages = [{"stage": "evaluations (zero-shot + every eval_freq)", "prompts": evaluations * len(encoded["test"]),
               "tokens": evaluations * test_tokens},
              {"stage": f"training: {steps} steps x (B*N task-encoder prompts + 2B reward sequences)",
               "prompts": steps * (b * n + 2 * b),
               "tokens": round(steps * (b * n * alone + 2 * b * (bos + n * labelled)))}]
    total = {"stage": "total", "prompts": sum(s["prompts"] for s in stages), "tokens": sum(s["tokens"] for s in stages)}
    speed = step_seconds(cfg.model.name, device.type)
    seconds = None if speed is None else steps * speed["seconds_per_step"] * b * n / speed["examples_per_step"]
    return {"stages": stages, "total": total, "estimate_seconds": seconds, "step_benchmark": speed, "throughput": None,
            "model": cfg.model.name, "device": device.type}


def finetuning_estimate_line(plan: dict) -> str:
    speed = plan["step_benchmark"]
    if speed is None:
        return (f"no estimate of the wall time: benchmarks/ holds no fine-tuning step time for {plan['model']} on "
                f"{plan['device']} (scripts/bench_uft.py measures one)")
    return (f"estimated wall time: {duration(plan['estimate_seconds'])}, the {speed['seconds_per_step']:.1f} s per "
            "step "
            f"of {speed['examples_per_step']} examples measured for {plan['model']} on a "
            f"{speed['cpu_count']}-core CPU ({speed['benchmark']}) scaled by the examples per step; evaluations and "
            "model loading not counted")


def check_finetuning_size(cfg, data, device) -> dict | None:
    """:func:`check_run_size` for fine-tuning: ``dry_run=true`` prints the counts and returns them; on a CPU a
    run estimated at more than an hour stops unless ``allow_long_cpu_run=true``."""
    from ..data.tasks import modality

    dry = cfg.dry_run
    guard = device.type == "cpu" and not cfg.allow_long_cpu_run
    if not dry and not (guard and step_seconds(cfg.model.name, device.type) is not None):
        return None
    if modality(cfg) != "text":
        if dry:
            raise ConfigError("dry_run=true counts the prompts of text tasks; image tasks have no dry run yet")
        return None
    plan = finetuning_plan(cfg, data, prompt_encoder(cfg, dry_run_tokenizer(cfg.model)), device)
    if dry:
        rows = [*plan["stages"], plan["total"]]
        width = max(len(r["stage"]) for r in rows) + 2
        print("\n".join([f"dry run of fine-tuning {cfg.dataset.name} / {cfg.model.name} on {device}: "
                         f"{len(data.train)} pool / {len(data.test)} test examples, B={cfg.batch_size}, N={cfg.N}, "
                         f"{cfg.num_iterations} steps. Nothing was trained or written.",
                         f"  {'stage':<{width}}{'prompts':>12}{'tokens':>14}"]
                        + [f"  {r['stage']:<{width}}{r['prompts']:>12,}{r['tokens']:>14,}" for r in rows]
                        + ["  " + finetuning_estimate_line(plan)]), flush=True)
        return {"dry_run": plan}
    seconds = plan["estimate_seconds"]
    if seconds is not None and seconds > LONG_CPU_RUN_SECONDS:
        raise ConfigError(
            f"this fine-tuning run would take about {duration(seconds)} on a CPU like the benchmark's "
            f"({cfg.num_iterations} steps of B={cfg.batch_size} x N={cfg.N} examples; "
            f"{plan['step_benchmark']['benchmark']}). The defaults are the paper's GPU setting. For a run of minutes: "
            f"{UFT_QUICK}; dry_run=true prints the counts and the estimate. To run it on this CPU anyway: "
            "allow_long_cpu_run=true")
    return None
