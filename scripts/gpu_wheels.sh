#!/usr/bin/env bash
# Fill .whl/ with the wheels that the GPU machine lacks, for scripts/gpu_kit.sh to install offline.
#
#   bash scripts/gpu_wheels.sh            # here, with network access; prints the folder's size
#
# The GPU machine (Python 3.12, no network) already has torch, torchvision, transformers 5.17, peft,
# accelerate, einops, timm, numpy, pandas, pyarrow, fsspec, xxhash, huggingface_hub, pytest and
# pytest-timeout. It lacks the packages below, taken at the versions that pyproject.toml and
# requirements_vlm.txt pin, without their dependencies (every one named here is pure Python).
# transformers and peft come at our pinned versions: 5.24 is what the CPU tests run. vLLM and
# flash-attention are far too large to carry (hundreds of MB) and stay out of the kit.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
BUDGET_MIB=40   # what travels to the GPU machine is limited to 64 MiB, the repository included
PACKAGES=(
  hydra-core==1.3.2 omegaconf==2.3.0                               # configs
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19                # datasets and what the image lacks of its needs
  gguf==0.19.0                                                     # embedded models (imported by the loaders)
  transformers==5.24.0 peft==0.21.2                                # the versions the CPU tests run
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13               # OpenFlamingo's CLIP
  open_flamingo==2.0.1 einops-exts==0.0.4
)

rm -rf "$WHEELS" && mkdir -p "$WHEELS"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${PACKAGES[@]}"
# antlr4-python3-runtime 4.9.3 (hydra's parser) is published as source only: build its pure-Python wheel here
python3 -m pip wheel -q --no-deps -w "$WHEELS" antlr4-python3-runtime==4.9.3

ls -1 "$WHEELS"
size=$(du -cb "$WHEELS"/*.whl | tail -1 | cut -f1)
echo "$(ls "$WHEELS"/*.whl | wc -l) wheels, $((size / 1024)) KiB in $WHEELS"
if ((size > BUDGET_MIB * 1024 * 1024)); then
  echo "error: the wheels exceed ${BUDGET_MIB} MiB" >&2
  exit 1
fi
