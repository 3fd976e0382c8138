"""The GPU kit on a CPU: its shell logic and benchmark code paths on a tiny shape, its wheel list against our
pins, the Gemma shape against the cached config, and the ``gpu`` tests collected but skipped."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from joint_inference.core.utils import cache_dir
from joint_inference.models.shapes import SHAPES
from tests.conftest import REPO


def kit(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REPO / "scripts" / "gpu_kit.sh")], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_KIT_TINY": "1", **env},
                          timeout=600)
    return done, json.loads((out / "stages.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the kit runs its full shapes")
def test_kit_runs_the_benchmarks_on_a_tiny_shape_and_records_each_stage(tmp_path):
    done, stages = kit(tmp_path, GPU_KIT_STAGES="scoring uft")
    assert done.returncode == 0, done.stdout[-3000:]
    assert set(stages) == {"facts", "imports", "scoring", "uft"}
    assert all(s["exit"] == 0 and s["seconds"] <= s["limit"] for s in stages.values())
    facts = json.loads((tmp_path / "out" / "facts.json").read_text())
    assert facts["machine"]["cuda_available"] is False
    assert facts["after_install"]["import_errors"]["joint_inference.methods.uicl"] is None

    scoring = json.loads((tmp_path / "out" / "gpu_scoring_tiny.json").read_text())
    assert scoring["predictions_agree"] and scoring["shared_predictions_agree"]
    assert scoring["naive_prompts"] == 8 and scoring["num_prompts"] == 32 and scoring["N"] == 16
    assert 500 < scoring["tokens_per_prompt"] < 650  # 16-shot prompts of SST-2-length sentences
    assert scoring["flops"]["shared"] < scoring["flops"]["batched"] < scoring["flops"]["naive"]
    assert all(0 < mfu < 2 for mfu in scoring["mfu"].values()) and scoring["transformers"]

    uft = json.loads((tmp_path / "out" / "gpu_uft_tiny.json").read_text())
    for design in ("one_copy", "two_copies"):
        for run in uft["designs"][design].values():
            assert run["seconds_per_step"] > 0 and run["peak_memory_bytes"] is None  # no GPU memory to read


def test_kit_skips_what_its_time_budget_cannot_hold(tmp_path):
    done, stages = kit(tmp_path, GPU_KIT_SECONDS="5", GPU_KIT_STAGES="scoring")
    assert done.returncode == 0
    assert stages == {name: {"skipped": "out of time"} for name in ("facts", "imports", "scoring")}


def test_wheels_are_the_pinned_versions():
    """scripts/gpu_wheels.sh brings the versions that pyproject.toml and requirements_vlm.txt pin."""
    def pinned(*files):
        return dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][0-9.]*)", "\n".join((REPO / f).read_text() for f in files)))

    wheels, pins = pinned("scripts/gpu_wheels.sh"), pinned("pyproject.toml", "requirements_vlm.txt")
    shared = set(wheels) & set(pins)
    assert {"transformers", "datasets", "hydra-core", "omegaconf", "peft", "gguf", "open_clip_torch",
            "open_flamingo", "einops-exts"} <= shared
    assert {name: wheels[name] for name in shared} == {name: pins[name] for name in shared}


@pytest.mark.skipif(not (cache_dir() / "models" / "gemma3_270m" / "config.json").exists(),
                    reason="the embedded Gemma has not been converted on this machine")
def test_gemma_shape_is_the_cached_config():
    cached = json.loads((cache_dir() / "models" / "gemma3_270m" / "config.json").read_text())
    _, dims = SHAPES["gemma3_270m"]
    for key, value in dims.items():
        assert cached[key] == (pytest.approx(value) if isinstance(value, float) else value), key


@pytest.mark.skipif(torch.cuda.is_available(), reason="they run on a GPU machine")
def test_gpu_tests_are_collected_and_skipped_without_cuda():
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "--strict-markers", "-p",
                           "no:cacheprovider", "tests/test_gpu.py"], cwd=REPO, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "GPU_TESTS_DEVICE"}, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    assert re.search(r"^(\d+) skipped", done.stdout.splitlines()[-1]) and "passed" not in done.stdout
