"""The unsupervised fine-tuning run (docs/protocol.md §4) for text and image tasks, from task to results.

Shared by ``unsupervised_ft_llm.py`` and ``unsupervised_ft_vlm.py``: the composition root hands over the
task and the scorer of the model (with its adapters), and everything here is modality-agnostic.
"""
from __future__ import annotations

import logging
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..core.distributed import is_main_process, process_state
from ..core.errors import ConfigError
from ..core.settings import FTSettings
from ..core.utils import fingerprint_digest, flatten, resolve_device
from ..data.files import FileData
from ..data.files import labelled as has_labels
from ..data.hub import TaskData
from ..models.language import compute_dtype, dtype_before_recorded
from ..reporting.files import file_finetuning_results
from ..reporting.plots import plot_learning_curve
from ..reporting.results import control_lines, interval, interval_note, pct, write_results
from ..scoring.scorer import Scorer
from .controls import paired_gain
from .finetune import (
    CalibratedTaskEncoder,
    LinearTaskEncoder,
    LMReward,
    LoraTaskEncoder,
    fit,
    frozen,
    label_head,
    lm_features,
    predict_labels,
    zero_shot_log_prior,
)
from .icl import zero_shot_logprobs

log = logging.getLogger(__name__)
# Keys that do not change the trained parameters: they may differ when a run is resumed.
RUNTIME_KEYS = ("output_dir", "num_iterations", "eval_freq", "ckpt_freq", "device", "progress", "wandb", "controls",
                "wandb_project", "forward_batch_size", "dataset.data_root", "dry_run", "allow_long_cpu_run",
                "dataset.path")  # dataset.path: where the file is; its rows are in the data fingerprint


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def finetuning_table(results: dict) -> str:
    """results.md of a fine-tuning run: test accuracy at each evaluation with its 95% interval (none
    without labels), the predicted classes, the training signals averaged since the evaluation before,
    and what the columns mean."""
    n, s = results["num_test"], results["settings"]
    labelled = results.get("labelled", True)
    names = (s.get("config") or {}).get("labelset.names")
    lines = [f"# {results['task']} / {results['model']}: unsupervised fine-tuning "
             f"({results['task_encoder']} task encoder, {s['estimator']} estimator)", ""]
    columns = ["step", *["test accuracy", "95% interval"] * labelled, "predicted classes", "reward, argmax labels",
               "reward, sampled labels", "entropy", "flip rate"]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]

    def number(x):
        return "" if x is None else f"{x:.4f}"

    def classes(shares):
        if not shares:
            return ""
        return ", ".join(f"{name} {100 * x:.0f}%" for name, x in zip(names or range(len(shares)), shares))

    for h in results["history"]:
        cells = [str(h["step"])]
        if labelled:
            cells += [pct(h["test_accuracy"]), interval(h["test_accuracy"], n)]
        cells += [classes(h.get("class_distribution")), number(h["reward_argmax"]), number(h["reward_sample"]),
                  number(h["entropy"]), number(h["flip_rate"])]
        lines.append("| " + " | ".join(cells) + " |")
    t, stopped = results["timing"], results["early_stopping"]["stopped_at"]
    trained = (f"{t['steps']} steps of B={s['B']} sequences of N={s['N']} examples ({t['train_seconds']:.1f} s of "
               "training" + (f"; stopped early at step {stopped}" if stopped else "") + ").")
    if labelled:
        lines += ["", f"Zero-shot {pct(results['zero_shot']['test_accuracy'])} -> fine-tuned "
                      f"{pct(results['final']['test_accuracy'])} after {trained}", ""]
        if "random_labels" in results.get("controls", {}):
            control = results["controls"]["random_labels"]
            lines += [f"Control, the same training with random labels: {pct(control['test_accuracy'])} after "
                      f"{control['history'][-1]['step']} steps (evaluations: "
                      + ", ".join(f"step {h['step']} {pct(h['test_accuracy'])}" for h in control["history"]) + ").", ""]
        lines += [
                  f"* **test accuracy**: the fraction of the {n} test examples whose argmax label under the task "
                  "encoder is right (step 0: the model before training, zero-shot).",
                  interval_note(n)]
    else:
        lines += ["", f"No label column (dataset.label_field unset): no accuracy. Trained {trained} Every row's "
                      "label before (zero-shot) and after training: predictions.csv and predictions.jsonl.", ""]
    lines += [f"* **predicted classes**: the share of the {n} test examples given each label by the task encoder.",
              "* **reward, entropy, flip rate**: means over the steps since the evaluation before (every step: "
              "metrics.jsonl).",
              "* **reward**: the frozen model's mean log-probability per example of a sequence's labels, read "
              "jointly (docs/protocol.md §3), for the task encoder's argmax and sampled labellings.",
              "* **entropy**: of the batch's mean prediction (nats); the regulariser keeps it from collapsing to 0.",
              "* **flip rate**: the fraction of a step's labels that changed since those examples were last drawn."]
    return "\n".join(lines + control_lines(results, FT_CONTROLS)) + "\n"


FT_CONTROLS = {"random_labels": ("control: the same training with random labels",
                                 ("*random labels*: the same training (steps, batches, seed, starting weights), the "
                                  "labelling the estimator reads drawn uniformly at random instead of from the task "
                                  "encoder (its own checkpoint and metrics: controls/random_labels/)"))}


def wandb_stats(stats: dict, label_names: list[str]) -> dict:
    """A step's statistics for wandb: the predicted class distribution as one number per label."""
    out = {k: v for k, v in stats.items() if k != "class_distribution" and v is not None}
    for name, share in zip(label_names, stats.get("class_distribution") or []):
        out[f"predicted_share/{name}"] = share
    return out


def check_rules(run: FTSettings) -> None:
    """Rules between keys beyond the schema's reach (before anything loads)."""
    num_processes = process_state().num_processes
    if run.calibrate_task_encoder and not run.calibrate:
        raise ConfigError("calibrate_task_encoder=true subtracts the calibrated reward's log-prior; "
                          "set calibrate=true as well, or calibrate_task_encoder=false")
    if run.batch_size % num_processes:
        raise ConfigError(f"batch_size B={run.batch_size} is not divisible by the number of processes P={num_processes}"
                          " (each process trains on B/P of the sequences); set batch_size to a multiple of "
                          f"{num_processes} or launch a number of processes that divides {run.batch_size}")


def check_pool(run: FTSettings, data: TaskData) -> None:
    """A step's sequences must fit in the unlabelled pool (before the model loads)."""
    if run.N * run.batch_size > len(data.train):
        raise ConfigError(f"N * batch_size = {run.N * run.batch_size} examples per step, but the unlabelled pool "
                          f"has {len(data.train)}; lower N or batch_size, or raise dataset.num_examples")


def run_finetuning(run: FTSettings, data: TaskData, scorer: Scorer, composed: dict,
                   image_features: dict[str, torch.Tensor] | None = None) -> dict:
    """Fine-tune the task encoder (``run.task_encoder``: the scorer's model with its LoRA adapters, or a linear
    head on the frozen model's features, or on ``image_features``) on ``data``; results in ``run.output_dir``.

    ``composed``: the run's configuration as composed (plain values), the record that the checkpoint's
    fingerprint and results.json keep of it. The caller seeds the run (``run.seed``) before the adapters are
    drawn.
    """
    out_dir = Path(run.output_dir)
    started = time.perf_counter()
    num_processes = process_state().num_processes
    device = resolve_device(run.device)
    examples = scorer.encoder.encode_splits(data)
    log.info("%s: %d unlabelled / %d test examples, label mode %s, task encoder %s", run.dataset.name,
             len(data.train), len(data.test), scorer.mode, run.task_encoder)

    # ---- task encoder and reward
    if run.task_encoder == "lora":
        task_encoder = LoraTaskEncoder(scorer, examples)
    elif image_features is not None:  # a linear head on CLIP image embeddings (docs/protocol.md §4)
        task_encoder = LinearTaskEncoder(image_features, scorer.encoder.num_labels, seed=run.seed)
    else:  # a linear head on the frozen LM's states, started at its zero-shot predictions
        features = {split: lm_features(scorer, ex) for split, ex in examples.items()}
        task_encoder = LinearTaskEncoder(features, scorer.encoder.num_labels, init=label_head(scorer))
    start = {"trainable": task_encoder.trainable_state(), "rng": torch.random.get_rng_state()}  # for the control
    log_prior = zero_shot_log_prior(scorer, examples["train"]) if run.calibrate else None
    reward = LMReward(scorer, examples["train"], log_prior)
    if run.calibrate_task_encoder:
        task_encoder = CalibratedTaskEncoder(task_encoder, log_prior)

    # ---- train (resumes from checkpoint.pt when the run directory has one)
    recorded = {k: v for k, v in flatten(composed).items() if k not in RUNTIME_KEYS}
    fingerprint = {**recorded, "label_mode": scorer.mode,
                   "schedule_steps": run.num_iterations if run.optimization.schedule == "cosine" else None,
                   "data": fingerprint_digest([data.train, data.test]), "dtype": compute_dtype(run.model, "hf", device)}
    on_step = None
    log_to_wandb = run.wandb and is_main_process()
    if log_to_wandb:
        import wandb  # optional: only imported when asked for

        wandb.init(project=run.wandb_project, config=composed, dir=str(out_dir))
        on_step = lambda step, stats: wandb.log(wandb_stats(stats, list(run.labelset.names)), step=step)  # noqa: E731
    unrecorded = {"dtype": dtype_before_recorded(run.model, "hf", device)}

    def train(directory: Path, fingerprint: dict, **how) -> dict:
        """``fit`` with its checkpoint and metrics in ``directory`` (the method's, or a control's)."""
        return fit(task_encoder, reward, pool_labels=data.train_labels, test_labels=data.test_labels, settings=run,
                   fingerprint=fingerprint, ckpt_path=directory / "checkpoint.pt",
                   metrics_path=directory / "metrics.jsonl", progress=run.progress, pool_size=len(data.train),
                   test_size=len(data.test), num_classes=scorer.encoder.num_labels, unrecorded=unrecorded, **how)

    state = train(out_dir, fingerprint, on_step=on_step)

    # ---- save the task encoder, results and the learning curve (all processes hold the same ones)
    if is_main_process():
        task_encoder.save(out_dir / ("adapter" if run.task_encoder == "lora" else "linear_head"))
    controls = {}
    if "random_labels" in run.controls:  # the same training from the same start, the labels drawn at random
        trained = task_encoder.trainable_state()
        method_test = predict_labels(task_encoder, "test", len(data.test))[0]
        task_encoder.load_trainable_state(start["trainable"])
        torch.random.set_rng_state(start["rng"])
        control_dir = out_dir / "controls" / "random_labels"
        control_dir.mkdir(parents=True, exist_ok=True)
        control = train(control_dir, {**fingerprint, "control": "random_labels"}, random_labels=True)
        controls["random_labels"] = {"test_accuracy": control["history"][-1]["test_accuracy"],
                                     "history": control["history"], "test": predict_labels(task_encoder, "test",
                                                                                           len(data.test))[0]}
        task_encoder.load_trainable_state(trained)
    history = state["history"]
    results = {
        "task": run.dataset.name, "model": run.model.name, "task_encoder": run.task_encoder,
        "num_train": len(data.train), "num_test": len(data.test), "skipped_rows": data.skipped_rows,
        "zero_shot": {"test_accuracy": state["zero_shot"]},
        "final": {"test_accuracy": history[-1]["test_accuracy"]},
        "history": history,
        "early_stopping": {**asdict(run.early_stopping), "stopped_at": state["stopped_at"],
                           "flip_rates": state["flip_rates"]},
        "timing": {"seconds": time.perf_counter() - started, "train_seconds": state["seconds"],
                   "steps": state["step"], "seconds_per_step": state["seconds"] / max(1, state["step"])},
        "peak_memory_bytes": peak_memory_bytes(device),
        "settings": {"estimator": run.estimator.name, "baseline": run.estimator.baseline, "B": run.batch_size,
                     "N": run.N, "gamma": run.gamma, "lr": run.optimization.lr, "calibrate": run.calibrate,
                     "calibrate_task_encoder": run.calibrate_task_encoder, "max_norm": run.max_norm,
                     "label_mode": scorer.mode, "seed": run.seed, "device": str(device),
                     "dtype": fingerprint["dtype"],
                     "processes": num_processes, "num_iterations": run.num_iterations,
                     "config": {k: v for k, v in recorded.items() if k != "seed"}},  # every other setting, flattened
        "data_fingerprint": fingerprint["data"],
    }
    if controls:
        results["controls"] = {name: {k: v for k, v in c.items() if k != "test"} for name, c in controls.items()}
        results["settings"]["controls"] = list(run.controls)
        if has_labels(data):
            results["gain_over_best_control"] = {"method": "fine-tuned", "control": "random_labels", **paired_gain(
                method_test == data.test_labels, controls["random_labels"]["test"] == data.test_labels, run.seed)}
    if isinstance(data, FileData):  # own data: every row's label before and after training in predictions.csv
        splits = ("test",) if data.transductive else ("train", "test")
        with frozen(scorer.model):
            zero_shot = {s: zero_shot_logprobs(scorer, examples[s]).argmax(-1).tolist() for s in splits}
        trained = {s: predict_labels(task_encoder, s, len(examples[s])) for s in splits}
        file_finetuning_results(out_dir, results, data, zero_shot, trained, list(run.labelset.names))
    title = f"{results['task']} / {results['model']}: fine-tuning ({run.task_encoder}, {run.estimator.name})"
    write_results(out_dir, results, finetuning_table,
                  lambda _, out: plot_learning_curve(history, state["metrics"], title, out / "learning_curve.png",
                                                      list(run.labelset.names)))
    if log_to_wandb:
        wandb.finish()
    if has_labels(data):
        log.info("zero-shot %.4f -> fine-tuned %.4f; results in %s", state["zero_shot"],
                 results["final"]["test_accuracy"], out_dir)
    else:
        log.info("no labels: no accuracy; the pool's labels after training are in %s", out_dir / "predictions.csv")
    return results


