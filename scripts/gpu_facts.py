"""Record the GPU machine and the versions of what the kit needs in a facts JSON (scripts/gpu_kit.sh).

    python scripts/gpu_facts.py OUT/facts.json before_install    # the machine, the preinstalled packages
    python scripts/gpu_facts.py OUT/facts.json after_install     # the packages imported after the kit's install

Each call adds its key to the file. ``after_install`` also imports every module the checks need and
records the error of any that fails, so a missing wheel shows before a test does.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = ("torch", "torchvision", "transformers", "tokenizers", "huggingface_hub", "safetensors", "peft",
            "accelerate", "datasets", "hydra-core", "omegaconf", "antlr4-python3-runtime", "gguf", "open_clip_torch",
            "open_flamingo", "einops", "einops-exts", "timm", "ftfy", "numpy", "pandas", "pyarrow", "fsspec", "xxhash",
            "dill", "multiprocess", "pytest", "pytest-timeout", "flash-attn", "vllm")
MODULES = ("hydra", "omegaconf", "datasets", "gguf", "transformers", "peft", "open_clip", "open_flamingo", "einops_exts",
           "joint_inference.methods.uicl", "joint_inference.methods.uft", "joint_inference.models.openflamingo")


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "nvidia_smi": smi, "cuda_available": cuda, "torch_cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if cuda else None,
            "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
            "bf16_supported": cuda and torch.cuda.is_bf16_supported()}


def imports() -> dict:
    """None for each module that imports, else its error."""
    errors = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
            errors[name] = None
        except Exception as err:  # any import failure is a fact to record
            errors[name] = f"{type(err).__name__}: {err}"
    return errors


def main() -> None:
    path, key = Path(sys.argv[1]), sys.argv[2]
    facts = json.loads(path.read_text()) if path.exists() else {}
    facts[key] = {"packages": versions()}
    if key == "before_install":
        facts["machine"] = machine()
    else:
        facts[key]["import_errors"] = imports()
    path.write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps({k: facts[k] for k in ("machine", key) if k in facts}, indent=2))


if __name__ == "__main__":
    main()
