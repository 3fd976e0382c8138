"""Benchmark unsupervised fine-tuning: seconds per training step and peak memory.

    python scripts/bench_uft.py --model gemma3_270m --B 4 --N 8 --steps 10 --out benchmarks/cpu_uft_gemma3_270m.json

Runs the real training loop (``unsupervised_ft_llm.run``) for a few steps on SST-2 ($DATA_ROOT, or
the hub) in a temporary run directory, with evaluation pushed past the end, and reports the
figures as JSON. Extra Hydra overrides can follow ``--``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3_270m")
    parser.add_argument("--B", type=int, default=8, help="sequences per step")
    parser.add_argument("--N", type=int, default=16, help="examples per sequence")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. model.dtype=bfloat16")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from joint_inference.utils import report_figures
    from unsupervised_ft_llm import run

    with tempfile.TemporaryDirectory() as out_dir, initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose("unsupervised_ft_llm", [
            f"model={args.model}", "dataset=sst2", f"batch_size={args.B}", f"N={args.N}",
            "dataset.num_examples=3000", f"num_iterations={args.steps}", f"eval_freq={args.steps + 1}",
            f"ckpt_freq={args.steps + 1}", f"device={args.device}", "progress=false", f"output_dir={out_dir}",
            *args.overrides])
        results = run(cfg)
    timing = results["timing"]
    figures = {
        "model": args.model, "device": results["settings"]["device"], "B": args.B, "N": args.N,
        "steps": timing["steps"], "seconds_per_step": timing["seconds_per_step"],
        "steps_per_s": 1 / timing["seconds_per_step"], "peak_memory_bytes": results["peak_memory_bytes"],
        "sequences_scored_per_step": 2 * args.B, "overrides": args.overrides,
    }
    report_figures(figures, args.out)


if __name__ == "__main__":
    main()
