"""Label-free diagnostics of unsupervised ICL rounds, against direct counts written here."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from joint_inference.methods.icl import icl_predict, label_free_diagnostics
from joint_inference.prompts.templates import PromptEncoder, Template
from joint_inference.scoring.scorer import Scorer
from tests.test_icl import icl_config


def test_diagnostics_equal_a_direct_count():
    rng = np.random.default_rng(0)
    previous, labels = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    votes = rng.integers(0, 3, (40, 5))
    logprob = -rng.random(40)
    got = label_free_diagnostics(labels, previous, votes, logprob, num_classes=4)

    flipped = sum(1 for a, b in zip(labels, previous) if a != b)
    agreeing = [sum(1 for v in votes[i] if v == labels[i]) / 5 for i in range(40)]
    assert got["flip_fraction"] == pytest.approx(flipped / 40)
    assert got["vote_agreement"] == pytest.approx(sum(agreeing) / 40)
    assert got["class_distribution"] == pytest.approx([list(labels).count(k) / 40 for k in range(4)])
    assert got["class_distribution"][3] == 0  # a class nobody predicts is reported, at 0
    assert got["mean_label_logprob"] == pytest.approx(sum(logprob) / 40)


@pytest.mark.parametrize("support_sampling", ["per_query", "shared"])
def test_label_logprob_is_the_majority_labels_log_prob_averaged_over_votes(tiny_llama, support_sampling):
    """The scorer's outputs, recorded as they leave it, give the same mean log-prob of the majority label."""
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, Template("Review: {sentence}\nSentiment: {y}"), ["bad", "good"])
    scorer = Scorer(model, encoder, "first", batch_size=4, show_progress=False)
    pool = encoder.encode_all([{"sentence": f"a film number {i}"} for i in range(12)])
    queries = encoder.encode_all([{"sentence": f"another film {i}"} for i in range(5)])
    recorded = []
    for name in ("label_logprobs", "shared_label_logprobs"):
        original = getattr(scorer, name)
        setattr(scorer, name, lambda *a, _f=original, **k: recorded.append(_f(*a, **k)) or recorded[-1])
    got = icl_predict(scorer, pool, np.arange(12) % 2, queries, n=2, num_repeats=3, rng_key=(0, 1, 0),
                      support_sampling=support_sampling, block_size=2)

    if support_sampling == "per_query":
        scores = torch.cat(recorded).reshape(5, 3, 2)  # prompts in query-major, vote-minor order
    else:  # per block, one (block queries, K) tensor per vote
        per_block = [torch.stack(recorded[i:i + 3], 1) for i in range(0, len(recorded), 3)]
        scores = torch.cat(per_block)
    for q in range(5):
        assert list(got.votes[q]) == [int(scores[q, r].argmax()) for r in range(3)]
        want = sum(float(scores[q, r, got.majority[q]]) for r in range(3)) / 3
        assert got.label_logprob[q] == pytest.approx(want, abs=1e-5)


def test_a_run_records_each_rounds_diagnostics_and_can_stop_on_them(tiny_llama_dir, tiny_sst2_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    results = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", "T=3"))
    stages = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]
    pool = [stages["zero_shot/train"]["train"]] + [stages[f"round_{t}/train"]["train"]
                                                             for t in (1, 2, 3)]
    for t, r in enumerate(results["rounds"], 1):
        d, labels = r["diagnostics"], pool[t]
        votes = stages[f"round_{t}/train"]["train_votes"]
        assert d["flip_fraction"] == pytest.approx(np.mean([a != b for a, b in zip(labels, pool[t - 1])]))
        assert d["class_distribution"] == pytest.approx([labels.count(k) / len(labels) for k in (0, 1)])
        assert d["vote_agreement"] == pytest.approx(np.mean([v == lab for vs, lab in zip(votes, labels) for v in vs]))
        assert d["mean_label_logprob"] <= 0
    assert results["stopped_after_round"] is None
    table = (tmp_path / "run" / "results.md").read_text()
    assert "## Label-free diagnostics" in table and table.count("\n| 3 | ") == 1

    # every round flips fewer than 101% of the labels: the rounds stop after the first
    stopped = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "stop", "T=3", "stop_when_flips_below=1.01"))
    assert stopped["stopped_after_round"] == 1 and len(stopped["rounds"]) == 1
    assert stopped["settings"]["stop_when_flips_below"] == 1.01
    assert stopped["rounds"][0] == results["rounds"][0]  # the same first round, then nothing more
    assert "stopped after round 1" in (tmp_path / "stop" / "results.md").read_text()
