"""Benchmark unsupervised fine-tuning: seconds per training step and peak memory.

    python scripts/bench_uft.py --model gemma3_270m --B 4 --N 8 --steps 10 --out benchmarks/cpu_uft_gemma3_270m.json
    python scripts/bench_uft.py --shape llama3.1_8b --B 8 --N 16 --steps 3 --out benchmarks/gpu_uft_llama3.1_8b.json

``--model``: runs the real training loop (``unsupervised_ft_llm.run``) for a few steps on SST-2
($DATA_ROOT, or the hub) in a temporary run directory, with evaluation pushed past the end. Extra
Hydra overrides can follow ``--``.

``--shape``: a random model of a real model's shape, built on the device (joint_inference/models/shapes.py),
trains on synthetic SST-2-length sentences through the loop's own step (``finetune.train_step``, with
the run's LoRA, estimator and optimiser settings) in four designs: our one copy of the weights (LoRA on
for the task encoder, off for the reward) and a two-copy design (a second frozen copy loaded for the
reward), each without and with gradient checkpointing. Peak GPU memory is measured per design, in the
same process, so the figures compare; a design that runs out of memory is reported as such.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def run_figures(args) -> dict:
    """Seconds per step and peak memory of the real run on ``args.model``. Each step is timed: the first one
    builds the bf16 CPU kernels (forward and backward), so the steady rate is the mean of the others."""
    from hydra import compose, initialize_config_dir

    from joint_inference.methods import finetune
    from joint_inference.runs.root import run_finetuning as run

    step, seconds = finetune.train_step, []

    def timed_step(*a, **k):
        start = time.perf_counter()
        out = step(*a, **k)
        seconds.append(time.perf_counter() - start)
        return out

    finetune.train_step = timed_step

    with tempfile.TemporaryDirectory() as out_dir, initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("unsupervised_ft_llm", [
            f"model={args.model}", "dataset=sst2", f"batch_size={args.B}", f"N={args.N}",
            "dataset.num_examples=3000", f"num_iterations={args.steps}", f"eval_freq={args.steps + 1}",
            f"ckpt_freq={args.steps + 1}", f"device={args.device}", "progress=false", f"output_dir={out_dir}",
            *args.overrides])
        results = run(cfg)
    timing = results["timing"]
    return {
        "model": args.model, "device": results["settings"]["device"], "dtype": results["settings"]["dtype"],
        "B": args.B, "N": args.N,
        "steps": timing["steps"], "seconds_per_step": sum(seconds[1:]) / max(1, len(seconds) - 1),
        "first_step_seconds": seconds[0], "step_seconds": seconds, "mean_seconds_per_step": timing["seconds_per_step"],
        "peak_memory_bytes": results["peak_memory_bytes"],
        "sequences_scored_per_step": 2 * args.B, "overrides": args.overrides,
    }


def shape_figures(args) -> dict:
    """Seconds per step and peak GPU memory of one copy vs two copies, without and with gradient checkpointing."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from joint_inference.core.utils import atomic_write_json, resolve_device
    from joint_inference.methods.finetune import LMReward, LoraTaskEncoder, add_lora, make_optimizer, train_step
    from joint_inference.models.language import resolve_dtype
    from joint_inference.models.shapes import model_bytes, random_lm
    from joint_inference.models.tiny import synthetic_sentences
    from joint_inference.prompts.templates import PromptEncoder, Template
    from joint_inference.scoring.scorer import Scorer

    cfg = OmegaConf.load(REPO / "configs" / "unsupervised_ft_llm.yaml")
    estimator = OmegaConf.load(REPO / "configs" / "estimator" / "rao_marginalized.yaml")
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = random_lm(args.shape, device, dtype)
    weights_bytes = model_bytes(model)
    model = add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, list(cfg.lora.target_modules))
    encoder = PromptEncoder(tokenizer, Template("{sentence}\nThe sentiment of the sentence is {y}."),
                            ["negative", "positive"])
    pool = encoder.encode_all([{"sentence": s} for s in synthetic_sentences(4 * args.B * args.N, length=args.words)])
    scorer = Scorer(model, encoder, "auto", cfg.forward_batch_size, show_progress=False)
    task_encoder = LoraTaskEncoder(scorer, {"train": pool})

    def measure(reward, checkpointing: bool) -> dict:
        """Seconds per step (after one warm-up step) and the peak memory of these steps."""
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.train()  # transformers checkpoints layers in training mode only (Llama has no dropout)
        else:
            model.activation_checkpointing_disable()
            model.eval()
        scorer.batch_size = reward.scorer.batch_size = cfg.forward_batch_size  # as an out-of-memory may have left it
        optimizer, scheduler = make_optimizer(task_encoder.parameters(), cfg.optimization.lr)
        generator = torch.Generator().manual_seed(0)
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            seconds = []
            for _ in range(args.steps + 1):
                idx = torch.randperm(len(pool), generator=generator)[: args.B * args.N].view(args.B, args.N)
                start = time.perf_counter()
                train_step(task_encoder, reward, idx, optimizer, scheduler, estimator=estimator.name,
                           baseline=estimator.baseline, gamma=cfg.gamma, max_norm=cfg.max_norm, generator=generator)
                seconds.append(time.perf_counter() - start)  # train_step reads its losses back: synchronised
        except torch.OutOfMemoryError as err:
            return {"out_of_memory": str(err).splitlines()[0]}
        finally:
            del optimizer, scheduler
        return {"seconds_per_step": float(np.mean(seconds[1:])), "warm_up_seconds": seconds[0],
                "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if on_gpu else None,
                "forward_batch_size_after": min(scorer.batch_size, reward.scorer.batch_size)}

    designs = {"one_copy": {}, "two_copies": {}}
    figures = {
        "model": f"random, {args.shape}-shaped", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "B": args.B, "N": args.N, "steps": args.steps, "words_per_sentence": args.words,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)},
        "estimator": estimator.name, "forward_batch_size": cfg.forward_batch_size,
        "weights_bytes_one_copy": weights_bytes, "designs": designs}

    def record(design: str, reward) -> None:
        for checkpointing in (False, True):
            designs[design][f"checkpointing_{checkpointing}".lower()] = measure(reward, checkpointing)
            if args.out:  # what is measured so far, should a time limit stop the rest
                atomic_write_json(args.out, {**figures, "partial": True})

    record("one_copy", LMReward(scorer, pool))  # the same weights with the adapters off
    second, _ = random_lm(args.shape, device, dtype)  # the two-copy design's frozen reward model
    record("two_copies", LMReward(Scorer(second, encoder, "auto", cfg.forward_batch_size, show_progress=False), pool))

    def ratio(key, checkpointing):
        one, two = (designs[d][f"checkpointing_{checkpointing}".lower()].get(key) for d in ("one_copy", "two_copies"))
        return one / two if one and two else None

    return {**figures, "one_copy_over_two_copies": {
        f"{key}_checkpointing_{c}".lower(): ratio(key, c)
        for key in ("peak_memory_bytes", "seconds_per_step") for c in (False, True)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--shape", default=None, help="instead of --model: a random model of this shape (see above)")
    parser.add_argument("--B", type=int, default=8, help="sequences per step")
    parser.add_argument("--N", type=int, default=16, help="examples per sequence")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--words", type=int, default=6, help="--shape: words per synthetic sentence (~23 tokens)")
    parser.add_argument("--dtype", default="auto", help="--shape: auto is bf16 on GPUs that support it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="--model: more Hydra overrides, e.g. model.dtype=bfloat16")
    args = parser.parse_args()

    import transformers

    from joint_inference.core.utils import report_figures

    figures = shape_figures(args) if args.shape else run_figures(args)
    report_figures({**figures, "transformers": transformers.__version__}, args.out)


if __name__ == "__main__":
    main()
