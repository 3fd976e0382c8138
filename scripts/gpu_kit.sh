#!/usr/bin/env bash
# The GPU kit: every GPU check and benchmark in one offline command, within a time budget.
#
#   bash scripts/gpu_kit.sh                   # on the GPU machine, in the repository root, with .whl/ there
#   GPU_KIT_TINY=1 bash scripts/gpu_kit.sh    # tiny benchmark shapes: checks the kit itself, also on a CPU
#
# Stages, each under its own time limit and all of them under GPU_KIT_SECONDS (default 400, so that a
# rerun fits in 15 minutes of GPU time): the machine's facts; the wheels of .whl/ (scripts/gpu_wheels.sh
# fills it here) installed offline into a folder put first on PYTHONPATH, so our pinned transformers
# shadows the machine's; `pytest -m gpu` with a per-test timeout; the benchmarks (a Llama-3.1-8B-shaped
# model: scoring three ways with MFU, then fine-tuning with one vs two model copies; then a
# Gemma-3-270M-shaped model's scoring). A stage that fails or runs out of time does not stop the next.
# GPU_KIT_STAGES picks stages (default: "install tests scoring uft gemma"); PYTHON the interpreter.
#
# Written to $OUT (default /tmp/gpu_kit_out), 7 files: kit.log, stages.json (each stage's exit code and
# seconds), facts.json (machine, versions before and after the install, import errors), gpu_tests.xml
# (JUnit) and the benchmarks' gpu_*.json, which go to benchmarks/ when committed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package of this checkout (not pip-installed there)

OUT=${OUT:-/tmp/gpu_kit_out}
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_KIT_WHEELS:-.whl}
SITE=${GPU_KIT_SITE:-/tmp/gpu_kit_site}
STAGES=" ${GPU_KIT_STAGES:-install tests scoring uft gemma} "
deadline=$((SECONDS + ${GPU_KIT_SECONDS:-400}))
if [[ -n ${GPU_KIT_TINY:-} ]]; then
  LLAMA=tiny GEMMA=tiny PROMPTS=32 NAIVE=8 UFT="--B 2 --N 4 --steps 2"
else
  LLAMA=llama3.1_8b GEMMA=gemma3_270m PROMPTS=512 NAIVE=64 UFT="--B 8 --N 16 --steps 3"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
records=()
failed=0

# stage NAME SECONDS COMMAND...: COMMAND under the smaller of SECONDS and the time left; recorded in stages.json
stage() {
  local name=$1 limit=$2 left=$((deadline - SECONDS)) start=$SECONDS code
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "== $name: skipped, out of time"
    records+=("\"$name\": {\"skipped\": \"out of time\"}")
  else
    echo "== $name (at most ${limit}s): $*"
    timeout -k 10 "$limit" "$@"
    code=$?
    ((code == 0)) || failed=1
    echo "== $name: exit $code after $((SECONDS - start))s"
    records+=("\"$name\": {\"exit\": $code, \"seconds\": $((SECONDS - start)), \"limit\": $limit}")
  fi
  (IFS=,; echo "{${records[*]}}") >"$OUT/stages.json"
}

wanted() { [[ $STAGES == *" $1 "* ]]; }

main() {
  echo "== expected: one NVIDIA H100 80GB (an H200 at times), 16 cores, Python 3.12, torch 2.11 (CUDA 13),"
  echo "   transformers 5.17; found: $(nproc) cores, $("$PYTHON" --version 2>&1)"
  nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
  stage facts 60 "$PYTHON" scripts/gpu_facts.py "$OUT/facts.json" before_install
  if wanted install; then
    rm -rf "$SITE"
    stage install 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "$WHEELS"/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    du -sh "$WHEELS" "$SITE"
  fi
  stage imports 60 "$PYTHON" scripts/gpu_facts.py "$OUT/facts.json" after_install
  if wanted tests; then
    local per_test=()
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 150)
    stage tests 240 "$PYTHON" -m pytest -m gpu -q -rfEs "${per_test[@]}" --junitxml "$OUT/gpu_tests.xml"
  fi
  if wanted scoring; then
    stage scoring 150 "$PYTHON" scripts/bench_scoring.py --shape "$LLAMA" --N 16 --words 6 --num-prompts $PROMPTS \
      --naive-prompts $NAIVE --block-size 32 --out "$OUT/gpu_scoring_$LLAMA.json"
  fi
  if wanted uft; then
    stage uft 150 "$PYTHON" scripts/bench_uft.py --shape "$LLAMA" $UFT --out "$OUT/gpu_uft_$LLAMA.json"
  fi
  if wanted gemma; then
    stage gemma 90 "$PYTHON" scripts/bench_scoring.py --shape "$GEMMA" --N 16 --words 6 --num-prompts $PROMPTS \
      --naive-prompts $NAIVE --block-size 32 --out "$OUT/gpu_scoring_${GEMMA}_N16.json"
  fi
  echo "== done in ${SECONDS}s; results in $OUT:"
  ls -l "$OUT"
  return $failed
}

main 2>&1 | tee "$OUT/kit.log"
exit "${PIPESTATUS[0]}"
