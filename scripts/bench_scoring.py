"""Benchmark the batched scorer against the original's naive loop on the same N-shot prompts.

    python scripts/bench_scoring.py --model gemma3_270m --num-prompts 64 --out benchmarks/cpu_gemma3_270m.json
    python scripts/bench_scoring.py --model tiny_random_llm            # no real weights needed

Three ways to score the same N-shot prompts, in one run: the naive loop (one prompt per forward
pass, full-vocabulary logits at every position, as the original implementation does); the
batched scorer (length-sorted batches, output projection only at the query and only on the
label columns); and shared mode (one demonstration set per block of queries, encoded once and
reused through its key/value cache). The script checks that all three predict the same labels
and prints/writes the figures as JSON, with a paper round's seconds extrapolated from them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from joint_inference.icl import balanced_support  # noqa: E402
from joint_inference.models import load_model  # noqa: E402
from joint_inference.prompts import PromptEncoder, Template  # noqa: E402
from joint_inference.scoring import Scorer  # noqa: E402
from joint_inference.tiny import synthetic_sentences  # noqa: E402
from joint_inference.utils import report_figures, resolve_batch_size, resolve_device  # noqa: E402


def load_sentences(n: int) -> tuple[list[dict], np.ndarray, str]:
    """SST-2 rows from $DATA_ROOT when present, else synthetic sentences with random labels."""
    path = Path(os.environ.get("DATA_ROOT", "")) / "sst2" / "train.jsonl"
    if os.environ.get("DATA_ROOT") and path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
        return rows, np.array([r["label"] for r in rows]), "sst2"
    rows = [{"sentence": s} for s in synthetic_sentences(n)]
    return rows, np.random.default_rng(0).integers(0, 2, n), "synthetic"


def naive_label_logprobs(model, encoder: PromptEncoder, prompt, labels) -> torch.Tensor:
    """The original's way: one prompt, full logits everywhere, then pick the label tokens."""
    ids, positions = encoder.assemble(prompt, labels)
    logits = model(torch.tensor([ids], device=model.device)).logits[0]
    logprobs = torch.log_softmax(logits[positions[-1]].float(), -1)
    first_tokens = [ids_k[0] for ids_k in encoder.label_ids]
    return torch.log_softmax(logprobs[first_tokens], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3_270m", help="a configs/model/ name")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--N", type=int, default=8, help="demonstrations per prompt")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the scorer's auto choice")
    parser.add_argument("--block-size", type=int, default=32, help="queries sharing one demonstration set")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="override the model config's dtype")
    parser.add_argument("--also-dtype", default=None,
                        help="also time the batched and shared scorers with the model in this dtype (e.g. bfloat16)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    model_cfg = OmegaConf.load(REPO / "configs" / "model" / f"{args.model}.yaml")
    if args.dtype:
        model_cfg.dtype = args.dtype
    device = resolve_device(args.device)
    model, tokenizer = load_model(model_cfg, device)
    encoder = PromptEncoder(tokenizer, Template("{sentence}\nThe sentiment of the sentence is {y}."),
                            ["negative", "positive"])
    batch_size = resolve_batch_size(args.batch_size or "auto", device)
    scorer = Scorer(model, encoder, "first", batch_size=batch_size, show_progress=False)

    pool_size = max(200, args.N + 1)
    rows, gold, source = load_sentences(pool_size + args.num_prompts)
    pool, queries = encoder.encode_all(rows[:pool_size]), encoder.encode_all(rows[pool_size:])
    # One class-balanced demonstration set per block of queries: the naive loop and the batched
    # scorer read the same full prompts that shared mode scores from one cached prefix.
    rng = np.random.default_rng(0)
    blocks = [range(s, min(s + args.block_size, len(queries))) for s in range(0, len(queries), args.block_size)]
    block_demos = [balanced_support(gold[:pool_size], args.N, 2, rng) for _ in blocks]
    prompts = [[pool[d] for d in demos] + [queries[q]] for block, demos in zip(blocks, block_demos) for q in block]
    labels = [gold[demos].tolist() for block, demos in zip(blocks, block_demos) for _ in block]
    num_tokens = sum(len(encoder.assemble(p, lab)[0]) for p, lab in zip(prompts, labels))

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    def shared():
        return torch.cat([scorer.shared_label_logprobs([pool[d] for d in demos], gold[demos].tolist(),
                                                       queries[block.start:block.stop])
                          for block, demos in zip(blocks, block_demos)])

    with torch.inference_mode():
        scorer.label_logprobs(prompts[:2], labels[:2])  # warm-up
        naive, naive_s = timed(lambda: torch.stack([naive_label_logprobs(model, encoder, p, lab)
                                                    for p, lab in zip(prompts, labels)]))
        batched, batched_s = timed(lambda: scorer.label_logprobs(prompts, labels))
        shared_scores, shared_s = timed(shared)

    def agree(a, b):
        return bool((a.argmax(-1).cpu() == b.argmax(-1).cpu()).all())

    low_precision = {}
    if args.also_dtype:  # the batched and shared scorers again, in a lower precision, against the same naive loop
        model.to(getattr(torch, args.also_dtype))
        with torch.inference_mode():
            scorer.label_logprobs(prompts[:2], labels[:2])
            low_batched, low_batched_s = timed(lambda: scorer.label_logprobs(prompts, labels))
            low_shared, low_shared_s = timed(shared)
        low_precision = {args.also_dtype: {
            "batched_seconds": low_batched_s, "batched_speedup": naive_s / low_batched_s,
            "batched_predictions_agree": agree(naive, low_batched),
            "shared_seconds": low_shared_s, "shared_speedup": naive_s / low_shared_s,
            "shared_predictions_agree": agree(naive, low_shared),
            "max_abs_logprob_diff": float((naive.cpu() - low_batched.cpu()).abs().max())}}

    round_prompts = 3000 * 5  # a paper round: 3,000 examples x 5 votes
    figures = {
        "model": args.model, "device": str(device), "dtype": str(model.dtype).replace("torch.", ""),
        "num_prompts": len(prompts), "N": args.N, "batch_size": batch_size, "data": source,
        "num_tokens": num_tokens,
        "naive_seconds": naive_s, "batched_seconds": batched_s,
        "naive_prompts_per_s": len(prompts) / naive_s, "batched_prompts_per_s": len(prompts) / batched_s,
        "speedup": naive_s / batched_s, "tokens_per_s": num_tokens / batched_s,
        "predictions_agree": agree(naive, batched),
        "max_abs_logprob_diff": float((naive.cpu() - batched.cpu()).abs().max()),
        "block_size": args.block_size, "shared_seconds": shared_s, "shared_prompts_per_s": len(prompts) / shared_s,
        "shared_speedup": naive_s / shared_s, "shared_predictions_agree": agree(naive, shared_scores),
        "shared_max_abs_logprob_diff": float((naive.cpu() - shared_scores.cpu()).abs().max()),
        "uicl_round_seconds_3000_examples_5_votes": {
            "naive": round_prompts * naive_s / len(prompts), "batched": round_prompts * batched_s / len(prompts),
            "shared": round_prompts * shared_s / len(prompts)},
        "naive_vs_lower_precision": low_precision,
    }
    report_figures(figures, args.out)


if __name__ == "__main__":
    main()
