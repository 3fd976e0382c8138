"""Controls: label-free baselines run beside the method, at the method's own cost, to tell a real gain from one
that any demonstrations in the right format (or a free recalibration) would have given.

* ``random_labels`` (classification): round 1 of unsupervised ICL with its own demonstration draws, each
  demonstration shown with a uniformly random class instead of its pseudo-label: the format-only control
  of Min et al. (2022), "Rethinking the Role of Demonstrations".
* ``batch_calibrated`` (classification): zero-shot with batch calibration (Zhou et al., ICLR 2024): each
  class's probability minus its mean over the unlabelled pool, read from the zero-shot scores (no calls).
* ``random_labels`` (fine-tuning): the same training (steps, batches, seed, starting weights) with the
  labelling the estimator reads drawn uniformly at random instead of from the task encoder: does the
  accuracy still rise, as it does for random rewards in Spurious Rewards (Shao et al., 2025)?
* ``majority_vote`` (generation): zero-shot sampling with as many samples per question as the unsupervised
  run draws in all its stages (zero-shot and every round), answered by majority: self-consistency at equal
  compute, the comparison asked of test-time methods with majority-vote rewards (TTRL).

The method's gain over its best control is reported on the same test questions with a paired bootstrap
interval (:func:`paired_gain`).
"""
from __future__ import annotations

import numpy as np

from ..core.errors import ConfigError

CONTROLS = {"classification": ("random_labels", "batch_calibrated"), "generation": ("majority_vote",),
            "fine-tuning": ("random_labels",)}
RANDOM_LABELS_KEY = 7919  # keys the random labelling's generator apart from every stage's draws


def check_controls(controls, kind: str, protocol: str) -> None:
    """Refuse, before any work, a control that does not apply to this kind of task or protocol."""
    applicable = CONTROLS.get(kind, ())
    for control in controls:
        if control not in applicable:
            what = (f"{kind} tasks take {', '.join(applicable)}" if applicable else f"{kind} tasks take none yet")
            raise ConfigError(f"controls: {control!r} does not apply here ({what}); "
                              f"set controls=[{','.join(applicable)}] or controls=[]")
    if controls and protocol == "original":
        raise ConfigError(f"controls={list(controls)} with protocol=original: the original release runs no controls, "
                          "and its protocol is kept as it was; use protocol=clean or controls=[]")
    if len(set(controls)) != len(controls):
        raise ConfigError(f"controls={list(controls)} names a control twice; name each once")


def random_labelling(size: int, num_classes: int, seed: int) -> np.ndarray:
    """One uniformly random class per pool example, the labels the ``random_labels`` control shows."""
    return np.random.default_rng([seed, RANDOM_LABELS_KEY]).integers(num_classes, size=size)


def batch_calibrated(logprobs: np.ndarray, pool_logprobs: np.ndarray) -> np.ndarray:
    """Batch calibration's predictions: argmax over classes of p(y|x) minus the mean of p(y|x') over the
    unlabelled pool x' (probabilities, as Zhou et al. subtract them)."""
    prior = np.exp(np.asarray(pool_logprobs, dtype=np.float64)).mean(0)
    return (np.exp(np.asarray(logprobs, dtype=np.float64)) - prior).argmax(-1)


def paired_gain(method_right, control_right, seed: int = 0, resamples: int = 10_000) -> dict:
    """The method's accuracy minus the control's on the same test questions (whether each was answered right),
    with a 95% paired bootstrap interval: questions resampled with replacement, both answers of a question
    kept together."""
    method_right, control_right = np.asarray(method_right, dtype=bool), np.asarray(control_right, dtype=bool)
    difference = method_right.astype(np.float64) - control_right
    rng = np.random.default_rng([seed, RANDOM_LABELS_KEY, 1])
    means = difference[rng.integers(len(difference), size=(resamples, len(difference)))].mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"gain": float(difference.mean()), "low": float(low), "high": float(high), "n": len(difference),
            "interval": f"paired bootstrap, {resamples:,} resamples of the test questions, 95%",
            "method_only_right": int((method_right & ~control_right).sum()),
            "control_only_right": int((control_right & ~method_right).sum())}
