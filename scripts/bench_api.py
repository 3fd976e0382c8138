"""Requests per second of backend=openai against the local OpenAI-compatible server (tests/openai_server.py).

    python -m scripts.bench_api --out benchmarks/cpu_api_local_server.json
    python -m scripts.bench_api --model gemma3_270m --num-prompts 64     # the embedded Gemma behind the server

Run as a module from the repository's root: the server is the tests' (``tests.openai_server``).

Scores the same 8-shot SST-2-style classification prompts (one-token completions with top-20 log-probs, token-id
prompts) through the API client at several concurrencies, then again from the client's cache, and checks that
every run gives the same scores. The server runs in this process (one thread per connection, the model one
request at a time), so the figures are the client's and the HTTP layer's overhead plus the model's own time:
with the tiny model the model costs almost nothing; with a real one they approach the model's requests per second.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (a random 2-layer Llama) or gemma3_270m (embedded)")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--N", type=int, default=8, help="demonstrations per prompt")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="the server model's intra-op threads (1: steady figures on a shared 2-core machine)")
    args = parser.parse_args()

    import torch

    from joint_inference.api.client import APIClient, ClientSettings
    from joint_inference.models.language import load_model
    from joint_inference.models.tiny import synthetic_sentences
    from joint_inference.prompts.templates import PromptEncoder, Template
    from joint_inference.runs.config import config_option, read_model
    from joint_inference.scoring.api import APIScorer
    from tests.openai_server import OpenAICompatibleServer

    if args.model == "tiny":
        cfg = config_option("model", "tiny_random_llm")
    else:
        cfg = config_option("model", args.model)
        cfg.dtype = "float32"
    torch.set_num_threads(args.torch_threads)
    model, tokenizer = load_model(read_model(cfg), torch.device("cpu"))
    encoder = PromptEncoder(tokenizer, Template("{sentence}\nThe sentiment of the sentence is {y}."),
                            ["negative", "positive"], fold_shared_label_tokens=True)
    sentences = synthetic_sentences(args.num_prompts + args.N, length=12, seed=1)
    examples = encoder.encode_all([{"sentence": s} for s in sentences])
    prompts = [[*examples[i + 1:i + 1 + args.N], examples[i]] for i in range(args.num_prompts)]
    labels = [[(i + j) % 2 for j in range(args.N)] for i in range(args.num_prompts)]
    tokens = sum(len(encoder.assemble(p, lab)[0]) for p, lab in zip(prompts, labels))

    runs, reference = [], None
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, name=cfg.name) as server, \
            tempfile.TemporaryDirectory() as cache:
        for concurrency in args.concurrency:
            client = APIClient(ClientSettings(base_url=server.url, model=cfg.name, concurrency=concurrency,
                                              show_progress=False, cache_dir=f"{cache}/c{concurrency}"))
            scorer = APIScorer(client, encoder, "auto")
            start = time.perf_counter()
            scores = scorer.label_logprobs(prompts, labels)
            seconds = time.perf_counter() - start
            reference = scores if reference is None else reference
            runs.append({"concurrency": concurrency, "seconds": seconds, "requests_per_s": args.num_prompts / seconds,
                         "same_scores": bool(torch.allclose(scores, reference, atol=1e-5))})
            print(f"concurrency {concurrency}: {args.num_prompts / seconds:.1f} requests/s", flush=True)
        start = time.perf_counter()
        cached = scorer.label_logprobs(prompts, labels)  # the last client's cache holds every answer
        seconds = time.perf_counter() - start
        print(f"from the cache: {args.num_prompts / seconds:.1f} requests/s", flush=True)
    figures = {
        "what": "backend=openai classification requests against tests/openai_server.py in the same process",
        "command": "python -m scripts.bench_api " + " ".join(sys.argv[1:]),
        "model": args.model, "num_prompts": args.num_prompts, "N": args.N, "prompt_tokens": tokens,
        "requests": runs, "cache_requests_per_s": args.num_prompts / seconds,
        "cache_same_scores": bool(torch.allclose(cached, reference)),
        "machine": {"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads()},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
