"""Zero-shot, supervised ICL and unsupervised ICL rounds for classification (METHOD.md §5).

Every prediction goes through the shared :class:`~joint_inference.scoring.Scorer`. Random
draws are keyed by (seed, stage, split, query), so a query's demonstrations do not depend on
the order in which queries are processed, on batching or on resumption.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import ConfigError
from .prompts import EncodedExample
from .scoring import Scorer

SPLITS = ("test", "train")


def balanced_support(
    labels: np.ndarray, n: int, num_classes: int, rng: np.random.Generator, exclude: int | None = None
) -> np.ndarray:
    """Indices of ``n`` demonstrations, balanced over the classes of ``labels``.

    ``n`` is split evenly over the classes that have examples, leftovers go to randomly
    chosen classes, a class short of its quota gives all it has and the rest is filled at
    random; ``exclude`` (the query itself) is never drawn. The order is shuffled.
    """
    candidates = np.arange(len(labels))
    if exclude is not None:
        candidates = candidates[candidates != exclude]
    if n > len(candidates):
        raise ConfigError(f"N={n} demonstrations cannot be drawn from a pool of {len(candidates)} examples; lower N")
    members = [candidates[labels[candidates] == c] for c in range(num_classes)]
    present = [c for c in range(num_classes) if len(members[c])]
    quota = np.full(num_classes, n // len(present))
    quota[rng.choice(present, size=n % len(present), replace=False)] += 1
    chosen = [rng.choice(members[c], size=min(quota[c], len(members[c])), replace=False) for c in present]
    chosen = np.concatenate(chosen)
    if len(chosen) < n:
        rest = np.setdiff1d(candidates, chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, size=n - len(chosen), replace=False)])
    rng.shuffle(chosen)
    return chosen


def majority_vote(votes: np.ndarray, num_classes: int, rng: np.random.Generator) -> int:
    """Most frequent class among ``votes``; ties broken at random."""
    counts = np.bincount(votes, minlength=num_classes)
    return int(rng.choice(np.flatnonzero(counts == counts.max())))


def zero_shot_logprobs(scorer: Scorer, examples: Sequence[EncodedExample], desc: str | None = None):
    """(Q, K) label log-probs of each example alone."""
    return scorer.label_logprobs([[ex] for ex in examples], [[] for _ in examples], read="query", desc=desc)


def icl_predict(
    scorer: Scorer,
    pool: Sequence[EncodedExample],
    pool_labels: np.ndarray,
    queries: Sequence[EncodedExample],
    *,
    n: int,
    num_repeats: int,
    rng_key: tuple[int, ...],
    queries_are_pool: bool = False,
    desc: str | None = None,
) -> np.ndarray:
    """Majority-vote predictions of ``num_repeats`` n-shot prompts per query.

    Demonstrations are drawn class-balanced by ``pool_labels`` (gold labels for supervised ICL,
    pseudo-labels for UICL). With ``queries_are_pool`` query i is pool example i and is never
    among its own demonstrations.
    """
    num_classes = scorer.encoder.num_labels
    prompts, labels, rngs = [], [], []
    for q, query in enumerate(queries):
        rng = np.random.default_rng([*rng_key, q])
        for _ in range(num_repeats):
            demos = balanced_support(pool_labels, n, num_classes, rng, exclude=q if queries_are_pool else None)
            prompts.append([pool[d] for d in demos] + [query])
            labels.append(pool_labels[demos].tolist())
        rngs.append(rng)
    scores = scorer.label_logprobs(prompts, labels, read="query", desc=desc)
    votes = scores.argmax(-1).view(len(queries), num_repeats).cpu().numpy()
    return np.array([majority_vote(v, num_classes, rng) for v, rng in zip(votes, rngs)], dtype=np.int64)


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))
