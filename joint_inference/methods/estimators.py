"""Surrogate losses whose gradients estimate the gradient of the unsupervised fine-tuning objective.

The task encoder q(y|x) predicts independent per-example logits (B, N, K); labels y ~ q are sampled,
and a frozen model scores them with a reward R(y) of shape (B, N, K) where R[b, n, k] depends only on
the labels at earlier positions m < n. The objective is E_{y~q}[sum_n R(y)[n, y_n]], averaged over b.
Every surrogate here has a gradient that is an unbiased estimate of that objective's gradient; they
differ only in variance. Rewards are detached inside, so callers need not do it.
"""

import math

import torch

from ..core.errors import ConfigError
from ..core.settings import ESTIMATORS  # their names, which the estimator's schema checks


def _at(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """values[b, n, labels[b, n]] -> (B, N)."""
    return values.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _rao_marginalized(logits, labels, reward_sample, reward_argmax):
    """Sum position n's reward over its own label exactly; only earlier labels need a score function.

    The second term is the exact gradient of that marginal, not a score-function term, so the
    baseline only enters the first one.
    """
    log_p = logits.log_softmax(-1)
    p = log_p.exp()
    advantage = reward_sample if reward_argmax is None else reward_sample - reward_argmax
    expected_advantage = (advantage * p).detach().sum(-1)  # (B, N)
    log_q = _at(log_p, labels)
    log_q_before = log_q.cumsum(-1) - log_q  # sum_{m<n} logP[m, y_m]
    first = (expected_advantage[:, 1:] * log_q_before[:, 1:]).sum()
    second = ((reward_sample * p).detach() * log_p).sum()
    return -(first + second) / logits.shape[0]


def _rao(logits, labels, reward_sample, reward_argmax):
    """Position n's reward depends only on labels up to n, so it multiplies only their scores."""
    log_q = _at(logits.log_softmax(-1), labels)
    advantage = _at(reward_sample.detach(), labels)
    if reward_argmax is not None:
        advantage = advantage - _at(reward_argmax.detach(), logits.argmax(-1))
    return -(advantage * log_q.cumsum(-1)).sum() / logits.shape[0]


def _naive(logits, labels, reward_sample, reward_argmax):
    """Plain REINFORCE on the whole sequence's reward: the high-variance reference point."""
    log_q = _at(logits.log_softmax(-1), labels).sum(-1)
    advantage = _at(reward_sample.detach(), labels).sum(-1)
    if reward_argmax is not None:
        advantage = advantage - _at(reward_argmax.detach(), logits.argmax(-1)).sum(-1)
    return -(advantage * log_q).mean()


_IMPLEMENTATIONS = {"rao_marginalized": _rao_marginalized, "rao": _rao, "naive": _naive}


def surrogate_loss(estimator: str, logits, labels, reward_sample, reward_argmax=None) -> torch.Tensor:
    """Scalar loss to minimise; reward_argmax (R at the argmax labels) is the baseline, None for none.

    logits, reward_sample, reward_argmax: (B, N, K); labels: LongTensor (B, N) of the sampled labels.
    """
    if estimator not in _IMPLEMENTATIONS:
        raise ConfigError(f"unknown estimator {estimator!r}; valid ones are {', '.join(ESTIMATORS)}")
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, N, K), got {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ConfigError(f"a sequence needs at least 2 examples for joint inference, got N={logits.shape[1]}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape (B, N) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    for name, reward in (("reward_sample", reward_sample), ("reward_argmax", reward_argmax)):
        if reward is not None and reward.shape != logits.shape:
            raise ValueError(f"{name} must have the logits' shape {tuple(logits.shape)}, got {tuple(reward.shape)}")
    return _IMPLEMENTATIONS[estimator](logits, labels.long(), reward_sample, reward_argmax)


def batch_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch-average prediction; maximising it keeps the encoder from collapsing onto one class.

    Averaged in log space (logsumexp) so confident rows cannot underflow to log(0).
    """
    log_p = logits.log_softmax(-1).reshape(-1, logits.shape[-1])
    log_p_mean = log_p.logsumexp(0) - math.log(log_p.shape[0])
    return -(log_p_mean.exp() * log_p_mean).sum()
