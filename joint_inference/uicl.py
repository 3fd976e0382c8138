"""The unsupervised ICL run for classification tasks (METHOD.md §5), stage by stage.

Each stage (zero-shot, supervised baseline, round t) is saved when it finishes, so an
interrupted run resumes after the last finished stage.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .icl import SPLITS, accuracy, check_support_sampling, icl_predict, repeat_accuracy, zero_shot_logprobs
from .prompts import Template
from .results import RunState, fingerprint_digest, write_jsonl, write_results
from .scoring import Scorer
from .tasks import load_data, load_prompts, load_vllm_scorer
from .utils import resolve_batch_size, resolve_device, seed_everything

log = logging.getLogger(__name__)


def run_classification(cfg: DictConfig) -> dict:
    """Zero-shot, supervised ICL and T rounds of unsupervised ICL; results in ``cfg.output_dir``."""
    out_dir = Path(cfg.output_dir)
    seed_everything(cfg.seed)

    # ---- data, template, label set
    data = load_data(cfg)
    check_support_sampling(cfg.support_sampling, cfg.block_size)
    excluded = min(cfg.block_size, len(data.train)) if cfg.support_sampling == "shared" else 1
    if cfg.N > len(data.train) - excluded:
        raise ConfigError(f"N={cfg.N} is larger than the unlabelled pool allows ({len(data.train)} examples, "
                          f"{excluded} of them queries left out of their own demonstrations); "
                          "lower N (or block_size) or raise dataset.num_examples")
    gold = {"test": data.test_labels, "train": data.train_labels}

    # ---- model and scorer
    device = resolve_device(cfg.device)
    if cfg.get("backend", "hf") == "vllm":
        scorer, encoded = load_vllm_scorer(cfg, data)
    else:
        model, encoder, encoded = load_prompts(cfg, device, data)
        scorer = Scorer(model, encoder, cfg.label_mode, resolve_batch_size(cfg.batch_size, device),
                        show_progress=cfg.progress)
    log.info("%s: %d unlabelled / %d test examples, label mode %s", cfg.dataset.name,
             len(data.train), len(data.test), scorer.mode)

    state = RunState(out_dir / "state.json", {
        "task": cfg.dataset.name, "model": OmegaConf.to_container(cfg.model), "template": cfg.template.text,
        "labels": list(cfg.labelset.names), "label_mode": scorer.mode, "N": cfg.N,
        "num_repeats": cfg.num_repeats, "seed": cfg.seed, "support_sampling": cfg.support_sampling,
        "block_size": cfg.block_size if cfg.support_sampling == "shared" else None,
        "data": fingerprint_digest([data.train, data.test, data.train_labels.tolist(), data.test_labels.tolist()]),
    })

    def stage(name, num_prompts, compute):
        """Run ``compute`` unless a previous start already finished this stage."""
        if name not in state:
            start = time.perf_counter()
            state.finish(name, compute(), time.perf_counter() - start, num_prompts)
        return state[name]

    def icl(pool_labels, rng_stage, desc, splits=SPLITS):
        """Majority-vote predictions for ``splits`` (and each repeat's, as ``<split>_votes``) with
        demonstrations labelled by ``pool_labels``."""
        out = {}
        for split in splits:
            majority, votes = icl_predict(
                scorer, encoded["train"], pool_labels, encoded[split], n=cfg.N, num_repeats=cfg.num_repeats,
                rng_key=(cfg.seed, rng_stage, SPLITS.index(split)), queries_are_pool=split == "train",
                support_sampling=cfg.support_sampling, block_size=cfg.block_size, desc=f"{desc} [{split}]")
            out.update({split: majority.tolist(), f"{split}_votes": votes.tolist()})
        return out

    def scores(stage_predictions, splits=SPLITS):
        """Majority-vote accuracy per split, and the test accuracy's mean/std over repeats."""
        spread = repeat_accuracy(stage_predictions["test_votes"], gold["test"])
        return {**{f"{s}_accuracy": accuracy(stage_predictions[s], gold[s]) for s in splits},
                "test_accuracy_mean": spread["mean"], "test_accuracy_std": spread["std"]}

    # ---- round 0: zero-shot
    zero_shot = stage("zero_shot", len(data.train) + len(data.test), lambda: {
        split: zero_shot_logprobs(scorer, encoded[split], f"zero-shot [{split}]").argmax(-1).tolist()
        for split in SPLITS})

    # ---- baseline: supervised N-shot ICL with the true labels (never used by UICL)
    supervised = None
    if cfg.supervised_icl:
        supervised = stage("supervised_icl", len(data.test) * cfg.num_repeats,
                           lambda: icl(data.train_labels, 0, "supervised ICL", splits=("test",)))

    # ---- unsupervised ICL: relabel with the previous round's pseudo-labels
    rounds, pseudo = [], zero_shot
    for t in range(1, cfg.T + 1):
        labels = np.asarray(pseudo["train"], dtype=np.int64)
        pseudo = stage(f"round_{t}", (len(data.train) + len(data.test)) * cfg.num_repeats,
                       lambda: icl(labels, t, f"round {t}/{cfg.T}"))
        rounds.append(pseudo)
        log.info("round %d: test accuracy %.4f", t, accuracy(pseudo["test"], gold["test"]))

    # ---- results
    results = {
        "task": cfg.dataset.name, "model": cfg.model.name,
        "num_train": len(data.train), "num_test": len(data.test),
        "zero_shot": {f"{s}_accuracy": accuracy(zero_shot[s], gold[s]) for s in SPLITS},
        "supervised_icl": scores(supervised, ("test",)) if supervised else None,
        "rounds": [{"round": t, **scores(r)} for t, r in enumerate(rounds, 1)],
        "timing": {"seconds": state.seconds, "prompts_scored": state.prompts},
        "settings": {"N": cfg.N, "T": cfg.T, "num_repeats": cfg.num_repeats, "seed": cfg.seed,
                     "label_mode": scorer.mode, "support_sampling": cfg.support_sampling,
                     "block_size": cfg.block_size, "template": cfg.template.text, "labels": list(cfg.labelset.names),
                     "device": "vllm" if cfg.get("backend", "hf") == "vllm" else str(device)},
    }
    if cfg.save_predictions:
        fields = Template(cfg.template.text).fields
        write_jsonl(out_dir / "predictions.jsonl", [
            {"split": s, **{f: row[f] for f in fields}, "label": int(gold[s][i]), "zero_shot": zero_shot[s][i],
             "rounds": [r[s][i] for r in rounds]}
            for s in SPLITS for i, row in enumerate(data.test if s == "test" else data.train)])
    write_results(out_dir, results)
    log.info("results in %s", out_dir)
    return results
