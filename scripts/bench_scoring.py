"""Benchmark the batched scorer against the original's naive loop on the same N-shot prompts.

    python scripts/bench_scoring.py --model gemma3_270m --num-prompts 64 --out benchmarks/cpu_gemma3_270m.json
    python scripts/bench_scoring.py --model tiny_random_llm            # no real weights needed
    python scripts/bench_scoring.py --shape llama3.1_8b --N 16 --words 6 --num-prompts 512 --naive-prompts 64

Three ways to score the same N-shot prompts, in one run: the naive loop (one prompt per forward
pass, full-vocabulary logits at every position, as the original implementation does); the
batched scorer (length-sorted batches, output projection only at the query and only on the
label columns); and shared mode (one demonstration set per block of queries, encoded once and
reused through its key/value cache). The script checks that all three predict the same labels
and prints/writes the figures as JSON, with a paper round's seconds extrapolated from them, the
matrix-product FLOPs each way does and its model FLOP utilisation (MFU) against the matrix-product peak of
the model's dtype measured in the same run (``--also-dtype``: that dtype's peak for its figures). ``--shape`` builds a random model of a real
model's shape on the device (joint_inference/models/shapes.py): a GPU benchmark with no weights to download.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
from joint_inference.core.utils import report_figures, resolve_device, scoring_batch
from joint_inference.methods.icl import balanced_support
from joint_inference.models.language import fuse_cpu_bf16, load_model, resolve_dtype
from joint_inference.models.shapes import SHAPES, random_lm
from joint_inference.models.tiny import synthetic_sentences
from joint_inference.prompts.templates import PromptEncoder, Template
from joint_inference.runs.config import config_option, read_model
from joint_inference.scoring.scorer import Scorer, label_weights, split_body_head


def load_sentences(n: int, words: int) -> tuple[list[dict], np.ndarray, str]:
    """SST-2 rows from $DATA_ROOT when present, else synthetic sentences of ``words`` words with random labels."""
    path = Path(os.environ.get("DATA_ROOT", "")) / "sst2" / "train.jsonl"
    if os.environ.get("DATA_ROOT") and path.exists():
        rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
        return rows, np.array([r["label"] for r in rows]), "sst2"
    rows = [{"sentence": s} for s in synthetic_sentences(n, length=words)]
    return rows, np.random.default_rng(0).integers(0, 2, n), "synthetic"


def forward_flops(model, new_tokens: int, context: int = 0, head_rows: int = 0, head_columns: int = 0) -> float:
    """Matrix-product FLOPs of one forward pass over ``new_tokens`` that follow ``context`` cached ones:
    2 per body weight and token, causal attention (QK and AV: 2 x 2 x attended positions x heads x
    head_dim per token and layer) and the output projection on ``head_rows`` rows of ``head_columns`` columns."""
    body, _ = split_body_head(model)
    config = model.config.get_text_config()
    embeddings = sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Embedding))
    weights = sum(p.numel() for p in body.parameters() if p.dim() == 2) - embeddings
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    attended = new_tokens * context + new_tokens * (new_tokens + 1) / 2
    return (2 * weights * new_tokens + 4 * attended * width * config.num_hidden_layers
            + 2 * head_rows * head_columns * config.hidden_size)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product in ``dtype`` on ``device``: the MFU's denominator."""
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    repeats = 10
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * 2 * size**3 / (time.perf_counter() - start)


def naive_label_logprobs(model, encoder: PromptEncoder, prompt, labels) -> torch.Tensor:
    """The original's way: one prompt, full logits everywhere, then pick the label tokens."""
    ids, positions = encoder.assemble(prompt, labels)
    logits = model(torch.tensor([ids], device=model.device)).logits[0]
    logprobs = torch.log_softmax(logits[positions[-1]].float(), -1)
    first_tokens = [ids_k[0] for ids_k in encoder.label_ids]
    return torch.log_softmax(logprobs[first_tokens], -1)


def profile(name: str, fn) -> None:
    """Where the time of ``fn()`` (one way of scoring) goes: the operators by their own CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    with torch.inference_mode():
        fn()  # once first: kernel selection, allocator
        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
    print(f"{name}: {seconds:.2f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3_270m", help="a configs/model/ name")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="instead of --model: a random model of this shape, built on the device")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--naive-prompts", type=int, default=None,
                        help="time the naive loop on the first this many prompts only (default: all)")
    parser.add_argument("--N", type=int, default=8, help="demonstrations per prompt")
    parser.add_argument("--words", type=int, default=12,
                        help="words per synthetic sentence (without $DATA_ROOT); 6 gives SST-2's mean of ~23 tokens")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per pass; default: the scorer's auto choice")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="padded tokens per pass (default: the auto choice, a CPU's token budget)")
    parser.add_argument("--block-size", type=int, default=32, help="queries sharing one demonstration set")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="override the model config's dtype")
    parser.add_argument("--also-dtype", default=None,
                        help="also time the batched and shared scorers with the model in this dtype (e.g. bfloat16)")
    parser.add_argument("--compile", action="store_true",
                        help="the scorers' model body through torch.compile (dynamic shapes; compile time excluded)")
    parser.add_argument("--profile", type=int, default=0, metavar="P",
                        help="only profile the batched scorer on P prompts: torch.profiler's table of the operators "
                             "that take the time, no benchmark")
    parser.add_argument("--repeats", type=int, default=3,
                        help="time the batched and shared scorers this many times each and keep the median (the "
                             "naive loop, minutes long, runs once)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.shape:
        model, tokenizer = random_lm(args.shape, device, resolve_dtype(args.dtype or "auto", device))
    else:
        model_cfg = config_option("model", args.model)
        if args.dtype:
            model_cfg.dtype = args.dtype
        model, tokenizer = load_model(read_model(model_cfg), device)
    encoder = PromptEncoder(tokenizer, Template("{sentence}\nThe sentiment of the sentence is {y}."),
                            ["negative", "positive"])
    batch_size, batch_tokens = scoring_batch(args.batch_size or "auto", device)
    batch_tokens = args.batch_tokens or batch_tokens
    scorer = Scorer(model, encoder, "first", batch_size=batch_size, show_progress=False, batch_tokens=batch_tokens)
    if args.compile:
        scorer.body = torch.compile(scorer.body, dynamic=True)

    pool_size = max(200, args.N + 1)
    rows, gold, source = load_sentences(pool_size + args.num_prompts, args.words)
    pool, queries = encoder.encode_all(rows[:pool_size]), encoder.encode_all(rows[pool_size:])
    # One class-balanced demonstration set per block of queries: the naive loop and the batched
    # scorer read the same full prompts that shared mode scores from one cached prefix.
    rng = np.random.default_rng(0)
    blocks = [range(s, min(s + args.block_size, len(queries))) for s in range(0, len(queries), args.block_size)]
    block_demos = [balanced_support(gold[:pool_size], args.N, 2, rng) for _ in blocks]
    prompts = [[pool[d] for d in demos] + [queries[q]] for block, demos in zip(blocks, block_demos) for q in block]
    labels = [gold[demos].tolist() for block, demos in zip(blocks, block_demos) for _ in block]
    lengths = [len(encoder.assemble(p, lab)[0]) for p, lab in zip(prompts, labels)]
    num_tokens = sum(lengths)
    num_naive = min(args.naive_prompts or len(prompts), len(prompts))
    if args.profile:  # the batched scorer on P prompts, then shared mode on the queries of the first block
        profile(f"batched, {args.profile} prompts", lambda: scorer.label_logprobs(prompts[:args.profile],
                                                                                  labels[:args.profile]))
        demos = block_demos[0]
        profile(f"shared, {len(blocks[0])} queries", lambda: scorer.shared_label_logprobs(
            [pool[d] for d in demos], gold[demos].tolist(), queries[blocks[0].start:blocks[0].stop]))
        return

    def timed(fn, repeats: int = 1):
        """fn's output and its median seconds over ``repeats`` calls (a passing hiccup moves a one-second
        measurement by a fifth)."""
        seconds = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        return out, float(np.median(seconds))

    def shared():
        return torch.cat([scorer.shared_label_logprobs([pool[d] for d in demos], gold[demos].tolist(),
                                                       queries[block.start:block.stop])
                          for block, demos in zip(blocks, block_demos)])

    with torch.inference_mode():  # each way once on a few prompts first (kernel selection, allocator)
        naive_label_logprobs(model, encoder, prompts[0], labels[0])
        scorer.label_logprobs(prompts[:8], labels[:8])
        scorer.shared_label_logprobs([pool[d] for d in block_demos[0]], gold[block_demos[0]].tolist(), queries[:2])
        naive, naive_s = timed(lambda: torch.stack([naive_label_logprobs(model, encoder, p, lab)
                                                    for p, lab in zip(prompts[:num_naive], labels[:num_naive])]))
        batched, batched_s = timed(lambda: scorer.label_logprobs(prompts, labels), args.repeats)
        shared_scores, shared_s = timed(shared, args.repeats)
    naive_s *= len(prompts) / num_naive  # the loop's seconds for all the prompts, one prompt at a time

    def agree(a, b):
        return bool((a.argmax(-1).cpu() == b[: len(a)].argmax(-1).cpu()).all())

    def max_diff(a, b):
        return float((a.cpu() - b[: len(a)].cpu()).abs().max())

    vocab = model.config.get_text_config().vocab_size
    label_columns = len(label_weights(scorer.mode, encoder.label_ids)[0])
    prefixes = [len(encoder.context([pool[d] for d in demos], gold[demos].tolist())) for demos in block_demos]
    flops = {
        "naive": sum(forward_flops(model, n, head_rows=n, head_columns=vocab) for n in lengths),
        "batched": sum(forward_flops(model, n, head_rows=1, head_columns=label_columns) for n in lengths),
        "shared": sum(forward_flops(model, prefix) + sum(forward_flops(model, len(queries[q].prefix), context=prefix,
                                                                       head_rows=1, head_columns=label_columns)
                                                         for q in block)
                      for block, prefix in zip(blocks, prefixes)),
    }
    seconds = {"naive": naive_s, "batched": batched_s, "shared": shared_s}
    dtype = model.dtype
    peak = matmul_peak_flops(device, dtype)

    low_precision = {}
    if args.also_dtype:  # the batched and shared scorers again, in a lower precision, against the same naive loop
        model.to(getattr(torch, args.also_dtype))
        fuse_cpu_bf16(model, device)  # as load_model does for a model that computes in bf16 on a CPU
        with torch.inference_mode():
            scorer.label_logprobs(prompts[:8], labels[:8])  # the warm-up again: kernel choice, compiling
            scorer.shared_label_logprobs([pool[d] for d in block_demos[0]], gold[block_demos[0]].tolist(), queries[:2])
            low_batched, low_batched_s = timed(lambda: scorer.label_logprobs(prompts, labels), args.repeats)
            low_shared, low_shared_s = timed(shared, args.repeats)
        low_peak = matmul_peak_flops(device, model.dtype)
        low_precision = {args.also_dtype: {
            "matmul_peak_flops_per_s": low_peak,
            "mfu": {"batched": flops["batched"] / low_batched_s / low_peak,
                    "shared": flops["shared"] / low_shared_s / low_peak},
            "batched_seconds": low_batched_s, "batched_speedup": naive_s / low_batched_s,
            "batched_predictions_agree": agree(naive, low_batched),
            "shared_seconds": low_shared_s, "shared_speedup": naive_s / low_shared_s,
            "shared_predictions_agree": agree(naive, low_shared),
            "max_abs_logprob_diff": max_diff(naive, low_batched)}}

    round_prompts = 3000 * 5  # a paper round: 3,000 examples x 5 votes
    figures = {
        "model": f"random, {args.shape}-shaped" if args.shape else args.model, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "transformers": transformers.__version__,
        "num_prompts": len(prompts), "naive_prompts": num_naive, "N": args.N, "batch_size": batch_size, "batch_tokens": batch_tokens,
        "final_batch_size": scorer.batch_size, "data": source,
        "num_tokens": num_tokens, "tokens_per_prompt": num_tokens / len(prompts),
        "naive_seconds": naive_s, "batched_seconds": batched_s,
        "naive_prompts_per_s": len(prompts) / naive_s, "batched_prompts_per_s": len(prompts) / batched_s,
        "speedup": naive_s / batched_s, "tokens_per_s": num_tokens / batched_s,
        "naive_tokens_per_s": num_tokens / naive_s, "shared_tokens_per_s": num_tokens / shared_s,
        "predictions_agree": agree(naive, batched), "max_abs_logprob_diff": max_diff(naive, batched),
        "block_size": args.block_size, "repeats": args.repeats,
        "shared_seconds": shared_s, "shared_prompts_per_s": len(prompts) / shared_s,
        "shared_speedup": naive_s / shared_s, "shared_predictions_agree": agree(naive, shared_scores),
        "shared_max_abs_logprob_diff": max_diff(naive, shared_scores),
        "uicl_round_seconds_3000_examples_5_votes": {
            "naive": round_prompts * naive_s / len(prompts), "batched": round_prompts * batched_s / len(prompts),
            "shared": round_prompts * shared_s / len(prompts)},
        "matmul_peak_flops_per_s": peak,
        "flops": flops,
        "flops_ideal_speedup": {way: flops["naive"] / flops[way] for way in ("batched", "shared")},
        "mfu": {way: flops[way] / seconds[way] / peak for way in seconds},
        "naive_vs_lower_precision": low_precision, "compiled": args.compile,
    }
    report_figures(figures, args.out)


if __name__ == "__main__":
    main()
