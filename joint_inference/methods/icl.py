"""Zero-shot, supervised ICL and unsupervised ICL rounds for classification (docs/protocol.md §5).

Every prediction goes through the shared :class:`~joint_inference.scoring.scorer.Scorer`. Random
draws are keyed by (seed, stage, split, query), so a query's demonstrations do not depend on
the order in which queries are processed, on batching or on resumption.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.distributed import shard_map
from ..core.errors import ConfigError
from ..prompts.templates import EncodedExample
from ..scoring.scorer import LabelScorer

SPLITS = ("test", "train")
SUPPORT_SAMPLING = ("per_query", "shared")
PROTOCOLS = ("clean", "original")  # sampling protocol: ours, or the original release's


class ICLPredictions(NamedTuple):
    """What an ICL stage predicts for Q queries with R votes each."""

    majority: np.ndarray  # (Q,) the majority vote
    votes: np.ndarray  # (Q, R) each vote's label
    label_logprob: np.ndarray  # (Q,) log-prob (over the K labels) of the majority label, mean over votes


def balanced_support(
    labels: np.ndarray, n: int, num_classes: int, rng: np.random.Generator, exclude: Sequence[int] = (),
    protocol: str = "clean",
) -> np.ndarray:
    """Indices of ``n`` demonstrations, class-balanced by ``labels`` (docs/protocol.md).

    Quotas are set over all K classes: ``n // K`` each, the ``n % K`` leftovers to distinct random
    classes. Each class with examples gives its quota; the slots of classes with no example are
    filled uniformly at random from the whole pool, so a class that vanished from the
    pseudo-labels does not hand its slots to the classes still present. The order is shuffled.

    ``protocol="clean"`` (ours): draws without replacement, ``exclude`` (the queries themselves)
    never drawn, a class short of its quota gives all it has and the pool fills the rest.
    ``protocol="original"`` (the original release's): draws with replacement and ``exclude``
    ignored, so a query can be among its own demonstrations.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    replace = protocol == "original"
    candidates = np.arange(len(labels))
    if len(exclude) and not replace:
        candidates = np.setdiff1d(candidates, exclude)
    if n > len(candidates) and not replace:
        raise ConfigError(f"N={n} demonstrations cannot be drawn from a pool of {len(candidates)} examples; lower N")
    quota = np.full(num_classes, n // num_classes)
    quota[rng.choice(num_classes, size=n % num_classes, replace=False)] += 1
    chosen = [np.zeros(0, dtype=np.int64)]
    for c in range(num_classes):
        members = candidates[labels[candidates] == c]
        if len(members):
            size = quota[c] if replace else min(quota[c], len(members))
            chosen.append(rng.choice(members, size=size, replace=replace))
    chosen = np.concatenate(chosen)
    if len(chosen) < n:
        rest = candidates if replace else np.setdiff1d(candidates, chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, size=n - len(chosen), replace=replace)])
    rng.shuffle(chosen)
    return chosen


def class_weighted_support(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` demonstrations drawn independently, with replacement, each example weighted by one over
    the size of its class in ``labels``: a class present uniformly, then one of its examples. This is the
    original's vision script (a ``WeightedRandomSampler``): no quotas, so a prompt may miss classes present, and
    classes absent from the pseudo-labels get no slots."""
    weights = 1.0 / np.bincount(labels)[labels]
    return rng.choice(len(labels), size=n, replace=True, p=weights / weights.sum())


def majority_vote(votes: np.ndarray, num_classes: int, rng: np.random.Generator, protocol: str = "clean") -> int:
    """Most frequent class among ``votes``. Ties: broken at random (``clean``), or won by the
    smallest label as ``scipy.stats.mode`` does in the original (``original``)."""
    counts = np.bincount(votes, minlength=num_classes)
    if protocol == "original":
        return int(np.argmax(counts))
    return int(rng.choice(np.flatnonzero(counts == counts.max())))


@torch.inference_mode()
def zero_shot_logprobs(scorer: LabelScorer, examples: Sequence[EncodedExample], desc: str | None = None):
    """(Q, K) label log-probs of each example alone."""
    return torch.stack(shard_map(lambda idx: scorer.label_logprobs(
        [[examples[i]] for i in idx], [[] for _ in idx], read="query", desc=desc), len(examples)))


def check_support_sampling(support_sampling: str, block_size: int) -> None:
    if support_sampling not in SUPPORT_SAMPLING:
        raise ConfigError(f"unknown support_sampling {support_sampling!r}; valid: {', '.join(SUPPORT_SAMPLING)}")
    if support_sampling == "shared" and block_size < 1:
        raise ConfigError(f"block_size={block_size}: shared demonstrations need blocks of at least 1 query")


@torch.inference_mode()
def icl_predict(
    scorer: LabelScorer,
    pool: Sequence[EncodedExample],
    pool_labels: np.ndarray,
    queries: Sequence[EncodedExample],
    *,
    n: int,
    num_repeats: int,
    rng_key: tuple[int, ...],
    queries_are_pool: bool = False,
    support_sampling: str = "per_query",
    block_size: int = 32,
    protocol: str = "clean",
    class_weighted: bool = False,
    shown_labels: np.ndarray | None = None,
    desc: str | None = None,
) -> ICLPredictions:
    """Majority-vote predictions of ``num_repeats`` n-shot prompts per query, with each vote and the
    log-prob the prompts give the majority label.

    Demonstrations are drawn class-balanced by ``pool_labels`` (gold labels for supervised ICL,
    pseudo-labels for UICL). With ``queries_are_pool`` query i is pool example i and, under the
    ``clean`` protocol, never among its own demonstrations (see :func:`balanced_support`).
    ``support_sampling="per_query"`` (the original's) draws a demonstration set per query and
    repeat; ``"shared"`` draws one per block of ``block_size`` queries and repeat and encodes it
    once for the whole block. ``class_weighted``: each demonstration a class-weighted draw instead
    (:func:`class_weighted_support`, the original's vision script). ``shown_labels``: the labels the prompts
    show for the pool's examples, when not ``pool_labels`` (the draws still follow ``pool_labels``: the
    ``random_labels`` control).
    """
    check_support_sampling(support_sampling, block_size)
    step = 1 if support_sampling == "per_query" else block_size
    blocks = [range(start, min(start + step, len(queries))) for start in range(0, len(queries), step)]
    num_classes = scorer.encoder.num_labels
    rngs = [np.random.default_rng([*rng_key, block[0]]) for block in blocks]

    def draw(block, rng):
        if class_weighted:
            return class_weighted_support(pool_labels, n, rng)
        return balanced_support(pool_labels, n, num_classes, rng, exclude=block if queries_are_pool else (),
                                protocol=protocol)

    draws = [[draw(block, rng) for _ in range(num_repeats)] for block, rng in zip(blocks, rngs)]
    shown = pool_labels if shown_labels is None else np.asarray(shown_labels)
    if support_sampling == "per_query":
        prompts = [[pool[d] for d in demos] + [queries[b[0]]] for b, ds in zip(blocks, draws) for demos in ds]
        labels = [shown[demos].tolist() for ds in draws for demos in ds]
        scores = torch.stack(shard_map(lambda idx: scorer.label_logprobs(
            [prompts[i] for i in idx], [labels[i] for i in idx], read="query", desc=desc), len(prompts)))
    else:
        def score_blocks(idx):
            """(block queries, repeats, K) per block: each repeat's demonstrations encoded once."""
            return [torch.stack([scorer.shared_label_logprobs(
                [pool[d] for d in demos], shown[demos].tolist(), queries[blocks[b].start:blocks[b].stop]).cpu()
                for demos in draws[b]], 1) for b in tqdm(idx, desc=desc, disable=desc is None or not scorer.show_progress)]

        scores = torch.cat(shard_map(score_blocks, len(blocks)))
    scores = scores.reshape(len(queries), num_repeats, num_classes).float().cpu().numpy()
    votes = scores.argmax(-1)
    majority = np.array([majority_vote(votes[q], num_classes, rng, protocol)
                         for block, rng in zip(blocks, rngs) for q in block], dtype=np.int64)
    label_logprob = np.take_along_axis(scores, majority[:, None, None], -1)[..., 0].mean(1)
    return ICLPredictions(majority, votes, label_logprob)


def accuracy(pred: Sequence[int], gold: Sequence[int]) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def label_free_diagnostics(labels: Sequence[int], previous: Sequence[int], votes: Sequence[Sequence[int]],
                           label_logprob: Sequence[float] | None, num_classes: int) -> dict:
    """How a round relabelled the unlabelled pool, read without gold labels (docs/protocol.md §5).

    ``flip_fraction``: share of the pool whose label changed since ``previous`` (the round before);
    ``vote_agreement``: mean share of a query's votes that agree with its majority label;
    ``class_distribution``: share of the pool given each label; ``mean_label_logprob``: mean log-prob
    (over the K labels) that the round's prompts, whose demonstrations carry the previous labels,
    give each query's new label: the pseudo-likelihood of the labelling that joint inference raises.
    """
    labels, votes = np.asarray(labels), np.asarray(votes)
    return {"flip_fraction": float(np.mean(labels != np.asarray(previous))),
            "vote_agreement": float(np.mean(votes == labels[:, None])),
            "class_distribution": (np.bincount(labels, minlength=num_classes) / len(labels)).tolist(),
            "mean_label_logprob": None if label_logprob is None else float(np.mean(label_logprob))}


def repeat_accuracy(votes: Sequence[Sequence[int]], gold: Sequence[int]) -> dict[str, float]:
    """Mean and standard deviation over repeats of the accuracy of each repeat's prompts alone
    (what the paper's vision table reports beside the majority vote)."""
    per_repeat = (np.asarray(votes) == np.asarray(gold)[:, None]).mean(0)
    return {"mean": float(per_repeat.mean()), "std": float(per_repeat.std())}
