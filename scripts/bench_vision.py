"""Benchmark image prompts: the naive per-prompt pixel loop against cached image embeddings.

    DATA_ROOT=../shared/data python scripts/bench_vision.py --num-prompts 16 --N 4 --out benchmarks/cpu_vlm_vitb16.json

A random LLaVA-style VLM with a ViT-B/16-shaped vision tower (224 px, 12 layers, width 768) and an
8-layer, width-512 language model scores the same (N demonstrations + query) prompts of CIFAR-10
images two ways: one prompt per forward pass from pixels with full-vocabulary logits (what a naive
implementation does: every image through the vision tower once per prompt it appears in), and the
project's scorer, whose image embeddings are computed once per image and whose prompts are batched.
Prompts are built as in a UICL round with one vote, so each image is in N + 1 prompts on average (a
real run with ``num_repeats`` votes and T rounds reuses each image about (N + 1) x num_repeats x T
times). Reports prompts/s, the speed-up with and without the one-off feature time, and whether the
predictions agree.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VIT_B16 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
LM = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
      "num_key_value_heads": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--N", type=int, default=4, help="demonstrations per prompt")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import numpy as np
    import torch
    from hydra import compose, initialize_config_dir

    from joint_inference.core.utils import report_figures
    from joint_inference.data.images import load_image_task
    from joint_inference.models.vision import image_fragments, tiny_vlm
    from joint_inference.prompts.images import ImagePromptEncoder
    from joint_inference.prompts.templates import Template
    from joint_inference.scoring.scorer import Scorer, minimal_prefix_lengths

    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("unsupervised_icl_vlm", ["dataset=cifar10", "dataset.num_examples=300"])
    data = load_image_task(cfg.dataset, list(cfg.labelset.names))
    images = data.images
    model, processor = tiny_vlm(image_size=224, patch_size=16, vision=VIT_B16, text=LM)
    rng = np.random.default_rng(0)
    # as in a UICL round with one vote: every pool image is one prompt's query and N other prompts' demonstration
    pool = list(range(args.num_prompts))
    chosen = [[*rng.choice([i for i in pool if i != q], args.N, replace=False).tolist(), q] for q in pool]
    demo_labels = [rng.integers(0, 10, args.N).tolist() for _ in chosen]
    used = sorted({i for c in chosen for i in c})

    with torch.inference_mode():
        start = time.perf_counter()
        fragments, features = image_fragments(model, processor, [images[i] for i in used], progress=False)
        feature_seconds = time.perf_counter() - start
        slot = {image: k for k, image in enumerate(used)}
        encoder = ImagePromptEncoder(processor.tokenizer, Template(cfg.template.text), list(cfg.labelset.names),
                                     fragments, features)
        scorer = Scorer(model, encoder, "bot_minimal", args.batch_size, show_progress=False)
        prompts = [[encoder.encode({"image": slot[i]}) for i in c] for c in chosen]
        start = time.perf_counter()
        cached = scorer.label_logprobs(prompts, demo_labels)
        cached_seconds = time.perf_counter() - start

        lengths = minimal_prefix_lengths(encoder.label_ids)
        image_id = model.config.image_token_index
        start = time.perf_counter()
        naive = []
        for prompt, labels, c in zip(prompts, demo_labels, chosen):
            ids, positions = encoder.assemble(prompt, labels)
            ids = [image_id if t < 0 else t for t in ids]
            pixels = processor.image_processor(images=[images[i] for i in c], return_tensors="pt").pixel_values
            logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, positions[-1]].float()
            naive.append(torch.stack([logits[list(ids_[:m])].mean() for ids_, m in zip(encoder.label_ids, lengths)]))
        naive = torch.stack(naive).log_softmax(-1)
        naive_seconds = time.perf_counter() - start

    report_figures({
        "model": "random LLaVA: ViT-B/16-shaped tower (224 px), 8-layer width-512 Llama", "dtype": "float32",
        "num_prompts": args.num_prompts, "N": args.N, "images": len(used),
        "prompts_per_image": args.num_prompts * (args.N + 1) / len(used),
        "naive_prompts_per_s": args.num_prompts / naive_seconds,
        "cached_prompts_per_s": args.num_prompts / cached_seconds,
        "speedup": naive_seconds / cached_seconds,
        "feature_seconds_once": feature_seconds,
        "speedup_with_features": naive_seconds / (cached_seconds + feature_seconds),
        "predictions_agree": bool((naive.argmax(-1) == cached.argmax(-1)).all()),
        "max_abs_logprob_diff": float((naive - cached).abs().max()),
    }, args.out)


if __name__ == "__main__":
    main()
