"""Unsupervised fine-tuning (docs/protocol.md §4): task encoders, the reward, the training loop, checkpoints.

One copy of the base model serves both roles: the task encoder is the model with LoRA adapters
(or a linear head on fixed features), and the reward is the same model with the adapters
disabled, read by the shared :class:`~joint_inference.scoring.scorer.Scorer`. A training step draws
B*N pool examples, samples labels from the task encoder, scores the sampled and the argmax
labellings in one batched call, and takes an Adam step on the estimator's surrogate loss minus
``gamma`` times the batch entropy.
"""
from __future__ import annotations

import contextlib
import logging
import math
import pickle
import random
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.distributed import (
    average_gradients,
    gather_rows,
    is_main_process,
    mean_over_processes,
    process_state,
    shard_map,
)
from ..core.errors import ConfigError
from ..core.utils import atomic_write, differing_keys
from ..prompts.templates import EncodedExample
from ..reporting.results import write_jsonl
from ..scoring.scorer import Scorer
from .estimators import batch_entropy, surrogate_loss
from .icl import zero_shot_logprobs

log = logging.getLogger(__name__)
SCHEDULES = ("constant", "cosine")


# --------------------------------------------------------------------------------- task encoders
def linear_module_names(model) -> list[str]:
    """Distinct names of the model's linear layers (what LoRA can target), the output layer left out."""
    head = model.get_output_embeddings()
    linear = [name for name, module in model.named_modules()
              if module is not head and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")]
    return sorted({name.split(".")[-1] for name in linear})


def add_lora(model, r: int, alpha: float, dropout: float, target_modules: Sequence[str],
             exclude_modules: str | None = None):
    """The model wrapped by peft with LoRA adapters on ``target_modules`` (in place: one copy).

    ``exclude_modules``: a regex of module names left alone (a VLM's vision tower, whose attention
    layers share names with the language model's)."""
    from peft import LoraConfig, get_peft_model

    available = linear_module_names(model)
    targets = [t for t in target_modules if t in available]
    if not targets:
        raise ConfigError(f"LoRA target modules {list(target_modules)} match nothing in {type(model).__name__}; "
                          f"its linear modules are {available}. Set lora.target_modules=[...]")
    if len(targets) < len(target_modules):
        log.warning("LoRA targets %s are not in the model; using %s",
                    sorted(set(target_modules) - set(targets)), targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        exclude_modules=exclude_modules, bias="none",
                        task_type="CAUSAL_LM" if hasattr(model, "prepare_inputs_for_generation") else None)
    model = get_peft_model(model, config)
    if model.dtype == torch.bfloat16 and model.device.type == "cpu":
        adapters_in_bf16(model)
    return model


def adapters_in_bf16(model) -> int:
    """Make the LoRA layers of a bf16 model on a CPU compute their adapters in bf16; returns how many.

    peft keeps the adapters' parameters in fp32 and casts each layer's bf16 input up to them and the
    sum back down: two passes over the activations in and out of every adapted layer, a third of a
    bf16 training step here. Under autocast the adapters compute in bf16 instead, as mixed-precision
    training does on GPUs: the parameters, their gradients and Adam's state stay fp32 (so a
    checkpoint restores them exactly), and the products accumulate in fp32. GPUs keep peft's fp32
    adapters, as the original release trains them.
    """
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False  # the input stays bf16; autocast casts the adapters' weights
        layer.forward = types.MethodType(forward_in_bf16, layer)  # bound to the layer: a deepcopy rebinds it
    return len(layers)


def forward_in_bf16(layer, *args, **kwargs):
    """The LoRA layer's own forward under bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return type(layer).forward(layer, *args, **kwargs)


@contextlib.contextmanager
def frozen(model):
    """The frozen model: no autograd, and LoRA adapters disabled when there are any."""
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), adapters_off:
        yield


class LoraTaskEncoder:
    """q(y|x) of the LoRA'd model: the scorer's K-way log-probs at a single-example prompt's label position."""

    def __init__(self, scorer: Scorer, examples: dict[str, Sequence[EncodedExample]]):
        self.scorer, self.examples, self.model = scorer, examples, scorer.model

    def logits(self, split: str, idx: Sequence[int]) -> torch.Tensor:
        # the scorer itself, not the sharded zero_shot_logprobs: this output needs its autograd graph
        return self.scorer.label_logprobs([[self.examples[split][i]] for i in idx], [[] for _ in idx])

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p.requires_grad:
                    p.copy_(state[n])

    def save(self, directory: Path) -> None:
        """The adapter alone, loadable with ``PeftModel.from_pretrained(base_model, directory)``."""
        self.model.save_pretrained(directory)


class LinearTaskEncoder:
    """q(y|x) = softmax(W f(x) + b) on fixed features f (CLIP image embeddings, frozen LM states, ...)."""

    def __init__(self, features: dict[str, torch.Tensor], num_labels: int,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0):
        """``init``: (weight (K, dim), bias (K,)) to start from, e.g. :func:`label_head`. Otherwise PyTorch's
        default ``nn.Linear`` initialisation, as the original's vision head, drawn after ``torch.manual_seed(seed)``
        on a forked CPU generator: the same head whatever ran before, and the global state left as it was."""
        self.features = {split: f.detach().float() for split, f in features.items()}
        dim = next(iter(self.features.values())).shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            self.head = torch.nn.Linear(dim, num_labels)
        self.head.to(next(iter(self.features.values())).device)
        if init is not None:
            with torch.no_grad():
                self.head.weight.copy_(init[0])
                self.head.bias.copy_(init[1])

    def logits(self, split: str, idx: Sequence[int]) -> torch.Tensor:
        rows = torch.as_tensor(list(idx), device=self.features[split].device)
        return self.head(self.features[split][rows]).log_softmax(-1)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.head.named_parameters()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict(state)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(directory / "linear_head.pt", self.head.state_dict())


class CalibratedTaskEncoder:
    """A task encoder whose label log-probs have the frozen model's log-prior subtracted, in training and evaluation.

    The original's vision UFT does this to its LoRA task encoder when calibrating (``calibrated=true``):
    q(y|x) becomes proportional to q(y|x) / prior(y), the prior being the calibrated reward's. The result is
    not normalised; everything downstream (sampling, estimators, entropy, argmax) normalises it.
    """

    def __init__(self, encoder, log_prior: torch.Tensor):
        self.encoder, self.log_prior = encoder, log_prior

    def logits(self, split: str, idx: Sequence[int]) -> torch.Tensor:
        logits = self.encoder.logits(split, idx)
        return logits - self.log_prior.to(logits.device)

    def __getattr__(self, name: str):  # parameters, trainable_state, load_trainable_state, save: the encoder's
        return getattr(self.encoder, name)


def label_head(scorer: Scorer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, bias) mapping the LM's final hidden states to the scorer's K label scores.

    A linear head on :func:`lm_features` initialised with it starts at the model's zero-shot
    predictions (exactly, up to logit soft-capping). None in ``exact`` mode, which is not linear.
    """
    if scorer.label_weights is None:
        return None
    columns, weights = scorer.label_weights
    columns = columns.to(scorer.device)
    weight = weights.to(scorer.device) @ scorer.head.weight.detach().index_select(0, columns).float()
    bias = getattr(scorer.head, "bias", None)
    bias = torch.zeros(len(weights)) if bias is None else weights.to(scorer.device) @ bias.detach()[columns].float()
    return weight, bias.to(weight.device)


def lm_features(scorer: Scorer, examples: Sequence[EncodedExample]) -> torch.Tensor:
    """(Q, hidden) last hidden state of the frozen model at each example's label position."""
    with frozen(scorer.model):
        return scorer.query_hidden_states([[ex] for ex in examples], [[] for _ in examples])


# ---------------------------------------------------------------------------------------- reward
class LMReward:
    """R[b, n, k] of docs/protocol.md §3: log p(y_n = k | x_n, (x_<n, y_<n)) of the frozen model, divided by N.

    The scorer's model may carry LoRA adapters; they are disabled here, so this is the base model.
    With ``log_prior`` (calibration) the prior is subtracted before dividing by N.
    """

    def __init__(self, scorer: Scorer, examples: Sequence[EncodedExample], log_prior: torch.Tensor | None = None):
        self.scorer, self.examples, self.log_prior = scorer, examples, log_prior

    def __call__(self, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """idx, labels: (R, N) pool indices and their labels -> (R, N, K); all R sequences in one call."""
        prompts = [[self.examples[i] for i in row] for row in idx.tolist()]
        with frozen(self.scorer.model):
            reward = self.scorer.label_logprobs(prompts, labels.tolist(), read="all")
        if self.log_prior is not None:
            reward = reward - self.log_prior.to(reward.device)
        return reward / idx.shape[1]


def zero_shot_log_prior(scorer: Scorer, examples: Sequence[EncodedExample]) -> torch.Tensor:
    """(K,) log of the mean zero-shot label probabilities of the frozen model over ``examples``."""
    with frozen(scorer.model):
        logp = zero_shot_logprobs(scorer, examples, desc="log-prior")
    return logp.logsumexp(0) - math.log(len(examples))


# ------------------------------------------------------------------------------------ optimiser
def make_optimizer(params, lr: float, schedule: str = "constant", warmup_steps: int = 0, min_lr: float = 0.0,
                   total_steps: int = 1):
    """Adam and a LambdaLR: linear warm-up over ``warmup_steps``, then constant or cosine to ``min_lr``."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown optimization.schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    optimizer = torch.optim.Adam(params, lr=lr)
    floor = min_lr / lr if lr else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------- one step
def train_step(encoder, reward: Callable, idx: torch.Tensor, optimizer, scheduler, *, estimator: str,
               baseline: bool, gamma: float, max_norm: float, generator: torch.Generator,
               random_labels: bool = False) -> dict:
    """One update on the (B, N) pool indices ``idx``; returns the step's statistics over all B sequences.

    Labels are sampled with ``generator`` (on the CPU, so runs reproduce on any device); the
    sampled and the argmax labellings are scored together. Under several processes each one
    takes sequences ``rank::P`` and the step equals the one-process step: all B*N labels are
    sampled from the gathered logits (the generator advances alike everywhere), the entropy is
    over the whole batch, and the gradients are averaged before clipping. ``random_labels`` (the control of
    that name): the labelling the estimator reads is drawn uniformly at random, not from the task encoder.
    """
    b, n = idx.shape
    processes = process_state()
    rank, num_processes = processes.process_index, processes.num_processes
    mine = idx[rank::num_processes]
    logits = encoder.logits("train", mine.flatten().tolist()).view(len(mine), n, -1)
    all_logits = gather_rows(logits)
    probs = all_logits.detach().float().softmax(-1).cpu().view(b * n, -1)
    if random_labels:
        sample = torch.randint(probs.shape[-1], (b, n), generator=generator)[rank::num_processes].to(logits.device)
    else:
        sample = torch.multinomial(probs, 1, generator=generator).view(b, n)[rank::num_processes].to(logits.device)
    all_argmax = all_logits.detach().argmax(-1)
    argmax = all_argmax[rank::num_processes]
    rewards = reward(mine.repeat(2, 1), torch.cat([sample, argmax]))
    reward_sample, reward_argmax = rewards[: len(mine)].to(logits.device), rewards[len(mine):].to(logits.device)
    entropy = batch_entropy(all_logits)
    # the surrogate is a mean over this process's B/P sequences: averaging the gradients makes it the mean over B
    loss = surrogate_loss(estimator, logits, sample, reward_sample, reward_argmax if baseline else None)
    loss = loss - gamma * entropy
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    scheduler.step()

    def total(r, y):
        return r.gather(-1, y.unsqueeze(-1)).sum((1, 2)).mean().item()

    mean_loss, mean_reward_sample, mean_reward_argmax = mean_over_processes(
        [loss.item(), total(reward_sample, sample), total(reward_argmax, argmax)])
    return {"loss": mean_loss, "reward_sample": mean_reward_sample, "reward_argmax": mean_reward_argmax,
            "entropy": entropy.item(), "grad_norm": grad_norm.item(), "argmax": all_argmax.cpu()}


def predict_labels(encoder, split: str, size: int, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(argmax label, its probability) of the task encoder for each of the ``size`` examples of ``split``
    (the examples shared out over the processes)."""
    def predict(rows: list[int]) -> torch.Tensor:
        with torch.no_grad():
            probs = torch.cat([encoder.logits(split, rows[start:start + batch]).float().softmax(-1).cpu()
                               for start in range(0, len(rows), batch)])
        best = probs.max(-1)
        return torch.stack([best.indices.float(), best.values], -1)

    out = torch.stack(shard_map(predict, size)).numpy()
    return out[:, 0].astype(np.int64), out[:, 1]


def evaluate(encoder, split: str, gold: np.ndarray, batch: int = 256) -> float:
    """Accuracy of the task encoder's argmax labels on ``split`` (the examples shared out over the processes)."""
    return float((predict_labels(encoder, split, len(gold), batch)[0] == gold).mean())


def evaluation(encoder, gold: np.ndarray | None, size: int, num_classes: int) -> dict:
    """One evaluation on the test split: accuracy (None without gold labels) and the share of the
    examples given each label."""
    labels = predict_labels(encoder, "test", size)[0]
    return {"test_accuracy": None if gold is None else float((labels == gold).mean()),
            "class_distribution": (np.bincount(labels, minlength=num_classes) / max(1, len(labels))).tolist()}


# ---------------------------------------------------------------------------------- checkpoints
def atomic_torch_save(path: Path, obj) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def rng_states(generator: torch.Generator) -> dict:
    """The training generator and the global torch, CUDA, numpy and python states (torch.load-safe types)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"train": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": random.getstate()}


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    generator.set_state(states["train"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


# what the training loop keeps of itself in a checkpoint
TRAINING_STATE = ("step", "seconds", "zero_shot", "window", "metrics", "history", "last_labels", "flip_rates",
                  "stopped_at")


def load_checkpoint(path: Path, fingerprint: dict, unrecorded: dict | None = None) -> dict:
    """The checkpoint at ``path``; a ConfigError naming the keys when it was made with another config, or
    naming the file and the fix when it cannot be read. ``unrecorded``: the values of fingerprint keys that
    earlier versions did not record yet (what their checkpoints had)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:  # what torch raises varies with the cut
        reason = str(err).split(". ")[0] or "it ends early"
        raise ConfigError(f"{path} is damaged ({type(err).__name__}: {reason}); nothing else in {path.parent} was "
                          "changed. Delete it to train again from step 0, or use a new run directory "
                          "(hydra.run.dir=...)") from None
    saved = ckpt.get("fingerprint") if isinstance(ckpt, dict) else None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} loads but is not a checkpoint of this project (no fingerprint); nothing else in "
                          f"{path.parent} was changed. Delete it to train again from step 0, or use a new run "
                          "directory (hydra.run.dir=...)")
    differ = differing_keys(fingerprint, {**(unrecorded or {}), **saved})
    if differ:
        raise ConfigError(
            f"{path} is a checkpoint of a different configuration (keys differ: {differ}); "
            "use a new run directory (hydra.run.dir=...) or the original settings")
    return ckpt


# ------------------------------------------------------------------------------- early stopping
def record_flips(last_labels: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``labels`` that differ from those ``rows`` got when last drawn; stores the new ones.

    As in the original, a row never drawn before counts as labelled 0 (the argmax of the uniform
    distribution it starts with), so ``last_labels`` starts at zeros.
    """
    flipped = int((labels != last_labels[rows]).sum())
    last_labels[rows] = labels
    return flipped / len(rows)


def labels_settled(flip_rates: Sequence[float], below: float | None, window: int) -> bool:
    """The original's stopping rule: each of the last ``window`` steps flipped fewer than ``below`` of its labels."""
    return below is not None and len(flip_rates) >= window and all(rate < below for rate in flip_rates[-window:])


# ----------------------------------------------------------------------------------- the loop
def evaluation_line(evaluated: dict) -> str:
    shares = "/".join(f"{100 * x:.0f}" for x in evaluated["class_distribution"])
    accuracy = evaluated["test_accuracy"]
    return ("" if accuracy is None else f"test accuracy {accuracy:.4f}, ") + f"predicted classes {shares}%"


def fit(encoder, reward: Callable, *, pool_labels: np.ndarray | None, test_labels: np.ndarray | None, settings,
        fingerprint: dict, ckpt_path: Path, metrics_path: Path, progress: bool = True, unrecorded: dict | None = None,
        random_labels: bool = False,
        on_step: Callable[[int, dict], None] | None = None, pool_size: int | None = None,
        test_size: int | None = None, num_classes: int | None = None) -> dict:
    """Train for ``settings.num_iterations`` steps, resuming from ``ckpt_path`` when it exists.

    ``settings`` carries batch_size, N, num_iterations, gamma, max_norm, eval_freq, ckpt_freq,
    seed, estimator.{name, baseline}, optimization.{lr, schedule, warmup_steps, min_lr} and
    early_stopping.{flip_rate_below, window}. Returns the run's state: step, history (one entry
    per evaluation, rewards, entropy and flip rate averaged over the steps since the previous
    one), metrics (every step's statistics, also written to ``metrics_path`` with each
    checkpoint, so that the file matches the checkpoint a restart continues from), flip_rates
    (one per step: the fraction of the step's B*N argmax labels that changed since those
    examples were last drawn), stopped_at (the step at which :func:`labels_settled`
    stopped the run, else None), zero_shot and train seconds. Each evaluation records the test accuracy
    and the share of the test examples given each label (``class_distribution``). Without gold labels
    (``pool_labels``/``test_labels`` None, with ``pool_size``/``test_size``/``num_classes`` given) the
    accuracies are None and the rest is the same. The original checks its rule
    before the update of the step whose labels it reads; here that step's update is made. Under
    several processes (data-parallel, see :func:`train_step`) all hold this same state; the main
    one writes the checkpoint, and all read it to resume. ``unrecorded``: see :func:`load_checkpoint`;
    ``random_labels``: see :func:`train_step`.
    """
    b, n, opt = settings.batch_size, settings.N, settings.optimization
    pool_size = len(pool_labels) if pool_labels is not None else pool_size
    test_size = len(test_labels) if test_labels is not None else test_size
    if num_classes is None:
        with torch.no_grad():
            num_classes = int(encoder.logits("test", [0]).shape[-1])
    optimizer, scheduler = make_optimizer(encoder.parameters(), opt.lr, opt.schedule, opt.warmup_steps,
                                          opt.min_lr, settings.num_iterations)
    generator = torch.Generator().manual_seed(settings.seed)
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, fingerprint, unrecorded)
        try:
            encoder.load_trainable_state(ckpt["trainable"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_states(ckpt["rng"], generator)
            state = ckpt["state"]
            if missing := [key for key in TRAINING_STATE if key not in state]:
                raise KeyError(f"its state lacks {missing}")
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise ConfigError(f"{ckpt_path} loads but does not hold what this run's checkpoints hold "
                              f"({type(err).__name__}: {str(err)[:200]}); nothing else in {ckpt_path.parent} was "
                              "changed. Delete it to train again from step 0, or use a new run directory "
                              "(hydra.run.dir=...)") from None
        if state["step"] > settings.num_iterations:  # resuming would only relabel the longer run's results
            raise ConfigError(f"{ckpt_path} has trained {state['step']} steps, more than num_iterations="
                              f"{settings.num_iterations}; to resume, set num_iterations to {state['step']} or more "
                              "(a shorter run needs a new run directory, hydra.run.dir=...)")
        log.info("resuming from %s at step %d", ckpt_path, state["step"])
    else:
        evaluated = evaluation(encoder, test_labels, test_size, num_classes)
        log.info("zero-shot: %s", evaluation_line(evaluated))
        state = {"step": 0, "seconds": 0.0, "zero_shot": evaluated["test_accuracy"], "window": [], "metrics": [],
                 "history": [{"step": 0, **evaluated, "reward_argmax": None,
                              "reward_sample": None, "entropy": None, "flip_rate": None}],
                 "last_labels": torch.zeros(pool_size, dtype=torch.long), "flip_rates": [],
                 "stopped_at": None}

    def checkpoint():
        if not is_main_process():  # the processes hold the same weights and state
            return
        atomic_torch_save(ckpt_path, {
            "fingerprint": fingerprint, "trainable": encoder.trainable_state(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_states(generator), "state": state})
        write_jsonl(metrics_path, state["metrics"])

    bar = tqdm(total=settings.num_iterations, initial=state["step"],
               desc="control: random labels" if random_labels else "fine-tuning",
               disable=not progress or not is_main_process())
    stopping = settings.early_stopping
    while state["step"] < settings.num_iterations and state["stopped_at"] is None:
        start = time.perf_counter()
        idx = torch.randperm(pool_size, generator=generator)[: b * n].view(b, n)
        stats = train_step(encoder, reward, idx, optimizer, scheduler, estimator=settings.estimator.name,
                           baseline=settings.estimator.baseline, gamma=settings.gamma, max_norm=settings.max_norm,
                           generator=generator, random_labels=random_labels)
        state["seconds"] += time.perf_counter() - start
        state["step"] += 1
        step = state["step"]
        argmax = stats.pop("argmax")
        stats["batch_accuracy"] = (None if pool_labels is None else
                                   float((argmax.numpy() == pool_labels[idx.numpy()]).mean()))
        stats["flip_rate"] = record_flips(state["last_labels"], idx.flatten(), argmax.flatten())
        state["flip_rates"].append(stats["flip_rate"])
        if labels_settled(state["flip_rates"], stopping.flip_rate_below, stopping.window):
            state["stopped_at"] = step
            log.info("step %d: fewer than %g of the labels flipped in each of the last %d steps; stopping",
                     step, stopping.flip_rate_below, stopping.window)
        last = step == settings.num_iterations or state["stopped_at"] is not None
        stats["lr"] = scheduler.get_last_lr()[0]
        state["window"].append({k: stats[k] for k in ("reward_argmax", "reward_sample", "entropy", "flip_rate")})
        bar.update()
        bar.set_postfix(reward=f"{stats['reward_argmax']:.3f}", flips=f"{stats['flip_rate']:.2f}",
                        H=f"{stats['entropy']:.3f}")
        if step % settings.eval_freq == 0 or last:
            evaluated = evaluation(encoder, test_labels, test_size, num_classes)
            stats.update(evaluated)
            means = {k: float(np.mean([w[k] for w in state["window"]])) for k in state["window"][0]}
            state["history"].append({"step": step, **evaluated, **means})
            state["window"] = []
            log.info("step %d: %s, reward %.4f, entropy %.4f, flip rate %.3f", step, evaluation_line(evaluated),
                     means["reward_argmax"], means["entropy"], means["flip_rate"])
        state["metrics"].append({"step": step, **stats})
        if on_step is not None:
            on_step(step, stats)
        if step % settings.ckpt_freq == 0 or last:
            checkpoint()
    bar.close()
    return state

