"""A classification run on an lm-eval task, written in lm-evaluation-harness's own schema, so its tools and
notebooks read the run: ``lm_eval/results.json`` (``results.<task>."acc,none"``, ``"acc_stderr,none"``, and the
same for each stage as the task ``<task>@<stage>``: ``@zero_shot``, ``@supervised_icl``, ``@round_<t>``,
``@control_<name>``; the task itself holds the last round, or zero-shot where there is none) and ``lm_eval/samples_<task>@<stage>.jsonl`` (one
line per document, as lm-eval's ``--log_samples`` writes: ``doc_id``, ``doc``, ``target``, ``arguments``,
``filtered_resps``, ``acc``). ``results.json`` of the run gets the same ``results`` block under ``lm_eval``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..core.utils import atomic_write_json, atomic_write_text
from ..data.lm_eval import CHOICES_FIELD, TEXT_FIELD


def acc_stderr(correct: np.ndarray) -> float:
    """lm-eval's standard error of a mean: the sample standard deviation (n - 1) over sqrt(n)."""
    n = len(correct)
    if n < 2:
        return float("nan")
    return float(np.std(correct, ddof=1) / math.sqrt(n))


def stage_entry(name: str, correct: np.ndarray, metric: str) -> dict:
    return {"alias": name, f"{metric},none": float(correct.mean()), f"{metric}_stderr,none": acc_stderr(correct)}


def write_lm_eval_outputs(out_dir: str | Path, data, stages: dict[str, dict], final: str, num_shots: int,
                          model_name: str, metric: str) -> dict:
    """Write lm_eval/results.json and the per-stage samples; return the ``results`` block. ``stages``: {stage:
    {"predictions": per document, "logprobs": (docs, K) label log-probs or None}} in run order; ``final``: the
    stage the task's own entry reports (the last round, or zero-shot without rounds); ``metric``: ``acc`` or
    ``acc_norm``, how the run scored the choices."""
    task, gold = data.task, np.asarray(data.test_labels)
    out = Path(out_dir) / "lm_eval"
    results = {}
    for stage, got in stages.items():
        predictions = np.asarray(got["predictions"])
        correct = (predictions == gold).astype(float)
        name = f"{task.name}@{stage}"
        results[name] = stage_entry(name, correct, metric)
        lines = []
        for i, doc_id in enumerate(data.doc_ids):
            doc = task.docs[doc_id]
            context, choices = data.test[i][TEXT_FIELD], data.test[i][CHOICES_FIELD]
            row = {"doc_id": doc_id, "doc": doc, "target": int(gold[i]),
                   "arguments": [[context, task.target_delimiter + choice] for choice in choices],
                   "prediction": int(predictions[i]), "filter": "none", "metrics": [metric], metric: float(correct[i])}
            if got.get("logprobs") is not None:  # label log-probs renormalised over the choices
                row["filtered_resps"] = [[float(v), None] for v in got["logprobs"][i]]
            lines.append(json.dumps(row, default=str))
        atomic_write_text(out / f"samples_{name}.jsonl", "\n".join(lines) + "\n")
    results[task.name] = {**results[f"{task.name}@{final}"], "alias": task.name}
    n = len(data.doc_ids)
    names = list(results)
    atomic_write_json(out / "results.json", {
        "results": results,
        "versions": dict.fromkeys(names, task.version),
        "n-shot": {name: (0 if name.endswith("@zero_shot") else num_shots) for name in names},
        "higher_is_better": {name: {metric: True} for name in names},
        "n-samples": {name: {"original": len(task.docs), "effective": n} for name in names},
        "config": {"model": model_name, "limit": n if n < len(task.docs) else None,
                   "source": "joint-inference (unsupervised in-context learning)"},
    })
    return results
