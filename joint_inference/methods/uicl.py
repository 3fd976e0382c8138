"""The unsupervised ICL run for classification tasks (docs/protocol.md §5), stage by stage.

Each split of each stage (zero-shot, supervised baseline, round t) is saved when it finishes, so
an interrupted run resumes where it stopped, redoing at most one split of one stage.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError
from ..core.settings import ICLSettings
from ..core.utils import fingerprint_digest, resolve_device, seed_everything
from ..data.files import FileData
from ..data.files import labelled as has_labels
from ..data.hub import TaskData
from ..data.lm_eval import LMEvalData
from ..data.tasks import modality
from ..models.language import compute_dtype, dtype_before_recorded
from ..prompts.templates import Template
from ..reporting.files import file_run_results
from ..reporting.lm_eval import write_lm_eval_outputs
from ..reporting.results import RunState, stage_name, write_jsonl, write_results
from ..scoring.scorer import LabelScorer
from .controls import batch_calibrated, paired_gain, random_labelling
from .icl import SPLITS, accuracy, icl_predict, label_free_diagnostics, repeat_accuracy, zero_shot_logprobs

log = logging.getLogger(__name__)


def check_pool(run: ICLSettings, data: TaskData) -> None:
    """The unlabelled pool must hold N demonstrations besides the queries they are drawn for (before any model
    loads)."""
    excluded = min(run.block_size, len(data.train)) if run.support_sampling == "shared" else 1
    if run.protocol == "clean" and run.N > len(data.train) - excluded:
        raise ConfigError(f"N={run.N} is larger than the unlabelled pool allows ({len(data.train)} examples, "
                          f"{excluded} of them queries left out of their own demonstrations); "
                          "lower N (or block_size) or raise dataset.num_examples")


def run_classification(run: ICLSettings, data: TaskData, scorer: LabelScorer) -> dict:
    """Zero-shot, supervised ICL and T rounds of unsupervised ICL of ``scorer`` on ``data``; results in
    ``run.output_dir``.

    A transductive task (``data.transductive``: MMLU's subjects, a file of the user's) relabels its test
    questions only, each round drawing their demonstrations among themselves.
    """
    out_dir = Path(run.output_dir)
    seed_everything(run.seed)
    labelled = has_labels(data)  # False: a file without a label column, predict-only (data/files.py)
    gold = {"test": data.test_labels, "train": data.train_labels}
    splits, pool_split = (("test",), "test") if data.transductive else (SPLITS, "train")
    # The original's vision script draws demonstrations unlike its text scripts (class-weighted, no quotas),
    # relabels the unlabelled pool with one prompt per example, not a vote, and not after the last round: no
    # round reads those labels (the last round then has no pool diagnostics), unless they are the product (own data).
    vision_original = run.protocol == "original" and modality(run.dataset) == "image"
    repeats = {"test": run.num_repeats, "train": 1 if vision_original else run.num_repeats}  # prompts per query
    last_round_splits = ("test",) if vision_original and not isinstance(data, FileData) else splits
    encoded = scorer.encoder.encode_splits(data)
    device = resolve_device(run.device)
    dtype = compute_dtype(run.model, run.backend, device)
    log.info("%s: %d unlabelled / %d test examples, label mode %s", run.dataset.name,
             len(data.train), len(data.test), scorer.mode)

    state = RunState(out_dir / "state.json", {
        "task": run.dataset.name, "model": asdict(run.model), "template": run.template.text,
        "labels": list(run.labelset.names), "label_mode": scorer.mode, "N": run.N,
        "num_repeats": run.num_repeats, "seed": run.seed, "support_sampling": run.support_sampling,
        "block_size": run.block_size if run.support_sampling == "shared" else None, "protocol": run.protocol,
        "data": fingerprint_digest([data.train, data.test, *([data.train_labels.tolist(), data.test_labels.tolist()]
                                                             if labelled else [None, None]), data.supervised_pool]),
        "dtype": dtype,
    }, unrecorded={"dtype": dtype_before_recorded(run.model, run.backend, device)})

    def stage(name, stage_splits, predict, prompts_per_query: dict):
        """``predict(split)`` for each split of stage ``name`` and its test accuracy on the console.

        Each split is saved when it finishes (``round_1/test`` before ``round_1/train``), so a restart
        redoes only the splits left unfinished; draws are keyed by (seed, stage, split, query), so the
        results equal an uninterrupted run's.
        """
        out = {}
        for split in stage_splits:
            key = f"{name}/{split}"
            if key not in state:
                start = time.perf_counter()
                state.finish(key, predict(split), time.perf_counter() - start,
                             len(encoded[split]) * prompts_per_query[split])
            out.update(state[key])
        if labelled:
            log.info("%s: test accuracy %.4f", stage_name(name), accuracy(out["test"], gold["test"]))
        return out

    def icl(pool, pool_labels, rng_stage, desc, protocol=run.protocol, shown_labels=None):
        """predict(split) of an ICL stage: majority-vote predictions (and each repeat's, as
        ``<split>_votes``) with demonstrations from ``pool`` drawn by ``pool_labels`` (and shown with them,
        or with ``shown_labels``)."""
        def predict(split):
            predicted = icl_predict(
                scorer, pool, pool_labels, encoded[split], n=run.N, num_repeats=repeats[split],
                rng_key=(run.seed, rng_stage, SPLITS.index(split)), queries_are_pool=pool is encoded[split],
                support_sampling=run.support_sampling, block_size=run.block_size, protocol=protocol,
                class_weighted=vision_original, shown_labels=shown_labels, desc=f"{desc} [{split}]")
            return {split: predicted.majority.tolist(), f"{split}_votes": predicted.votes.tolist(),
                    f"{split}_label_logprob": predicted.label_logprob.round(6).tolist()}

        return predict

    def scores(stage_predictions, splits=splits):
        """Majority-vote accuracy per split, and the test accuracy's mean/std over repeats (none without labels)."""
        if not labelled:
            return {}
        spread = repeat_accuracy(stage_predictions["test_votes"], gold["test"])
        return {**{f"{s}_accuracy": accuracy(stage_predictions[s], gold[s]) for s in splits},
                "test_accuracy_mean": spread["mean"], "test_accuracy_std": spread["std"]}

    def zero_shot_predict(split):
        """Zero-shot predictions, with the label log-probs that batch calibration reads."""
        logprobs = zero_shot_logprobs(scorer, encoded[split], f"zero-shot [{split}]").float().cpu()
        return {split: logprobs.argmax(-1).tolist(), f"{split}_logprobs": logprobs.numpy().round(6).tolist()}

    # ---- round 0: zero-shot
    zero_shot = stage("zero_shot", splits, zero_shot_predict, dict.fromkeys(SPLITS, 1))

    # ---- baseline: supervised N-shot ICL with the true labels (never used by UICL)
    supervised = None
    if run.supervised_icl and not labelled:
        log.info("no labels (dataset.label_field unset): the supervised baseline is skipped")
    if run.supervised_icl and labelled:
        if data.supervised_pool is None:  # the pool's own examples (a transductive query never demonstrates itself)
            demonstrations, demonstration_labels = encoded[pool_split], gold[pool_split]
        else:
            demonstrations = scorer.encoder.encode_all(data.supervised_pool)
            demonstration_labels = data.supervised_labels
        # a labelled pool smaller than N (MMLU's validation split: 10 questions in some subjects) is
        # drawn from with replacement, as the original does
        supervised_protocol = run.protocol if len(demonstrations) >= run.N else "original"
        supervised = stage("supervised_icl", ("test",), icl(demonstrations, demonstration_labels, 0, "supervised ICL",
                                                            protocol=supervised_protocol), repeats)

    # ---- unsupervised ICL: relabel with the previous round's pseudo-labels
    rounds, diagnostics, pseudo, stopped_after = [], [], zero_shot, None
    for t in range(1, run.T + 1):
        labels = np.asarray(pseudo[pool_split], dtype=np.int64)
        pseudo = stage(f"round_{t}", last_round_splits if t == run.T else splits,
                       icl(encoded[pool_split], labels, t, f"round {t}/{run.T}"), repeats)
        rounds.append(pseudo)
        if pool_split not in pseudo:  # the original's vision script: the last round leaves the pool as it was
            diagnostics.append(None)
            continue
        diagnostics.append(label_free_diagnostics(pseudo[pool_split], labels, pseudo[f"{pool_split}_votes"],
                                                  pseudo.get(f"{pool_split}_label_logprob"), scorer.encoder.num_labels))
        log.info("round %d: %.1f%% of the unlabelled pool's labels flipped, vote agreement %.1f%%", t,
                 100 * diagnostics[-1]["flip_fraction"], 100 * diagnostics[-1]["vote_agreement"])
        if run.stop_when_flips_below is not None and diagnostics[-1]["flip_fraction"] < run.stop_when_flips_below:
            stopped_after = t
            log.info("round %d flipped fewer than %g of the labels: stopping (stop_when_flips_below)", t,
                     run.stop_when_flips_below)
            break

    # ---- controls (methods/controls.py): round 1's draws shown with random labels; batch-calibrated zero-shot
    controls = {}
    if "random_labels" in run.controls:
        shown = random_labelling(len(encoded[pool_split]), scorer.encoder.num_labels, run.seed)
        controls["random_labels"] = stage("control_random_labels", ("test",), icl(
            encoded[pool_split], np.asarray(zero_shot[pool_split], dtype=np.int64), 1, "control: random labels",
            shown_labels=shown), repeats)
    if "batch_calibrated" in run.controls:
        def calibrate(split):
            for s in [s for s in dict.fromkeys((split, pool_split)) if f"{s}_logprobs" not in zero_shot]:
                log.info("zero-shot [%s]: label log-probs scored again (a state file from before they were kept)", s)
                zero_shot.update(zero_shot_predict(s))
            calibrated = batch_calibrated(zero_shot[f"{split}_logprobs"], zero_shot[f"{pool_split}_logprobs"])
            return {split: calibrated.tolist()}
        controls["batch_calibrated"] = stage("control_batch_calibrated", ("test",), calibrate, {"test": 0})

    # ---- results
    results = {
        "task": run.dataset.name, "model": run.model.name,
        "num_train": len(data.train), "num_test": len(data.test), "skipped_rows": data.skipped_rows,
        "zero_shot": {f"{s}_accuracy": accuracy(zero_shot[s], gold[s]) for s in splits} if labelled else {},
        "supervised_icl": {**scores(supervised, ("test",)), "pool_size": len(demonstrations),
                           "protocol": supervised_protocol} if supervised else None,
        "rounds": [{"round": t, **scores(r, tuple(s for s in splits if s in r)), "diagnostics": d}
                   for t, (r, d) in enumerate(zip(rounds, diagnostics), 1)],
        "stopped_after_round": stopped_after,
        **control_results(controls, rounds, zero_shot, gold["test"], scores, labelled, run.seed),
        "timing": {"seconds": state.seconds, "prompts_scored": state.prompts},
        "settings": {"N": run.N, "T": run.T, "num_repeats": run.num_repeats, "seed": run.seed,
                     "label_mode": scorer.mode, "support_sampling": run.support_sampling, "protocol": run.protocol,
                     "transductive": data.transductive, "stop_when_flips_below": run.stop_when_flips_below,
                     "block_size": run.block_size, "template": run.template.text, "labels": list(run.labelset.names),
                     "controls": list(run.controls),
                     "device": "vllm" if run.backend == "vllm" else str(device), "dtype": dtype},
    }
    if isinstance(data, FileData):  # own data: predictions.csv/.jsonl always; results without accuracies if unlabelled
        file_run_results(out_dir, results, data, zero_shot, rounds, list(run.labelset.names), run.dataset.num_examples)
    elif run.save_predictions:
        fields = Template(run.template.text).fields
        write_jsonl(out_dir / "predictions.jsonl", [
            {"split": s, **{f: row[f] for f in fields}, "label": int(gold[s][i]), "zero_shot": zero_shot[s][i],
             "rounds": [r[s][i] if s in r else None for r in rounds],
             **({"controls": {name: c[s][i] if s in c else None for name, c in controls.items()}} if controls else {})}
            for s in splits for i, row in enumerate(data.test if s == "test" else data.train)])
    if isinstance(data, LMEvalData):  # lm-evaluation-harness's schema beside ours (reporting/lm_eval.py)
        stages = {"zero_shot": {"predictions": zero_shot["test"], "logprobs": zero_shot.get("test_logprobs")}}
        if supervised:
            stages["supervised_icl"] = {"predictions": supervised["test"]}
        stages.update({f"control_{name}": {"predictions": c["test"]} for name, c in controls.items()})
        stages.update({f"round_{t}": {"predictions": r["test"]} for t, r in enumerate(rounds, 1)})
        final = f"round_{len(rounds)}" if rounds else "zero_shot"
        results["lm_eval"] = {"results": write_lm_eval_outputs(out_dir, data, stages, final, run.N, run.model.name,
                                                               run.dataset.metric)}
    if labelled:
        write_results(out_dir, results)
    log.info("results in %s", out_dir)
    return results


def control_results(controls: dict, rounds: list, zero_shot: dict, gold, scores, labelled: bool, seed: int) -> dict:
    """results.json's ``controls`` (each control's scores) and ``gain_over_best_control``: the last round's
    accuracy minus that of the control that scored best, on the same test questions, with its paired interval."""
    if not controls:
        return {}
    out = {"controls": {name: scores(c, ("test",)) if "test_votes" in c else
                        ({"test_accuracy": accuracy(c["test"], gold)} if labelled else {})
                        for name, c in controls.items()}}
    if labelled:
        method = rounds[-1]["test"] if rounds else zero_shot["test"]
        best = max(controls, key=lambda name: out["controls"][name]["test_accuracy"])
        gain = paired_gain(np.asarray(method) == gold, np.asarray(controls[best]["test"]) == gold, seed)
        out["gain_over_best_control"] = {"method": f"round {len(rounds)}" if rounds else "zero-shot", "control": best,
                                         **gain}
    return out
