"""Golden outputs: short runs of the four entry scripts whose results must not change when the code moves.

Each case runs an entry script as a user types it (a subprocess, one torch thread) on data this module
writes, and compares what the run leaves with ``tests/golden/<case>.json``: the exit code, the ``error:``
lines, the dry run's console, and the contents of results.json, results.md, predictions and metrics
(timings, and the temporary paths, taken out). Integers, text and predictions must be equal; floats equal
to 1e-6 (another CPU may round a last digit differently; on one machine they are byte-identical, which
``GOLDEN_EXACT=1`` checks).

Record after an intended change of output: ``GOLDEN_RECORD=1 python -m pytest -q -m slow tests/test_golden.py``,
and read the diff of tests/golden/ before committing it.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, SHARED_DATA, write_jsonl

GOLDEN = REPO / "tests" / "golden"
RECORD = os.environ.get("GOLDEN_RECORD") == "1"
EXACT = os.environ.get("GOLDEN_EXACT") == "1"
WORDS = ["the", "a", "movie", "film", "was", "is", "good", "bad", "great", "awful", "boring", "fun", "story", "plot",
         "actors", "acting", "love", "hate", "very", "really", "quite", "not", "and", "but", "it", "this", "that",
         "world", "sports", "business", "technology", "yes", "no", "maybe"]
# keys whose values are measurements of the machine (wall clock, memory) or depend on them
MEASURED = re.compile(r"second|timing|elapsed|per_hour|wall|throughput|memory")
DURATION = re.compile(r"\b\d[\d.,]*\s?(s|min|h|hours?|minutes?|seconds?)\b")
OUTPUTS = ("results.json", "results.md", "predictions.jsonl", "predictions.csv", "answers.jsonl", "metrics.jsonl",
           "api_usage.json")

TINY = ["model=tiny_random_llm", "device=cpu", "progress=false"]
ICL = [*TINY, "forward_batch_size=4", "dataset.num_examples=24", "N=2", "T=2", "num_repeats=2"]
FT = [*TINY, "dataset.num_examples=24", "batch_size=2", "N=4", "num_iterations=4", "eval_freq=2", "ckpt_freq=2",
      "lora.r=4", "forward_batch_size=8"]
OWN = ["dataset=local", "labelset.names=[negative,positive]", "template.text={text}\\nThe sentiment is {y}."]
VLM = ["model=tiny_random_vlm", "dataset=cifar10", "dataset.num_examples=30", "device=cpu", "progress=false"]


@dataclass
class Case:
    script: str
    args: list[str]
    code: int = 0
    before: list[str] | None = None  # a first run into the same directory (resume)
    api: bool = False  # against the test server (model.base_url=<its address>)
    gemma: bool = False  # the embedded Gemma-3-270M on real SST-2 (../shared/data)
    extra: dict = field(default_factory=dict)


CASES = {
    "icl_clean": Case("unsupervised_icl_llm", [*ICL, "save_predictions=true"]),
    "icl_original": Case("unsupervised_icl_llm", [*ICL, "protocol=original", "dataset.sampler=original",
                                                  "save_predictions=true"]),
    "icl_shared": Case("unsupervised_icl_llm", [*ICL, "support_sampling=shared", "block_size=4"]),
    "icl_own_labelled": Case("unsupervised_icl_llm", [*ICL, *OWN, "dataset.path={root}/reviews.csv",
                                                      "dataset.label_field=label"]),
    "icl_own_unlabelled": Case("unsupervised_icl_llm", [*ICL, *OWN, "dataset.path={root}/notes.csv"]),
    "icl_mmlu_subjects": Case("unsupervised_icl_llm", [*TINY, "dataset=mmlu", "forward_batch_size=8", "N=3", "T=2",
                                                       "num_repeats=2", "dataset.subjects=[anatomy,virology,astronomy]"]),
    "icl_gsm8k": Case("unsupervised_icl_llm", [*TINY, "dataset=gsm8k", "N=2", "T=1", "num_repeats=1",
                                               "max_new_tokens=12"]),
    # the tiny random model's labels are rarely among its 20 most likely tokens: 400 reads them all
    "icl_api": Case("unsupervised_icl_llm", ["backend=openai", "model=openai_compatible", "model.name=tiny",
                                             "model.pretrained={root}/tiny_llama", "label_mode=first",
                                             "dataset.num_examples=12", "N=2", "T=1", "num_repeats=2",
                                             "model.max_top_logprobs=400", "progress=false"], api=True),
    "refused_api_labels_outside_top_k": Case("unsupervised_icl_llm", [
        "backend=openai", "model=openai_compatible", "model.name=tiny", "model.pretrained={root}/tiny_llama",
        "label_mode=first", "dataset.num_examples=12", "N=2", "T=1", "num_repeats=2", "progress=false",
        "model.score_with=top_logprobs", "model.prompt_format=tokens"], code=2, api=True),
    "icl_vision": Case("unsupervised_icl_vlm", [*VLM, "N=2", "T=1", "num_repeats=1", "save_predictions=true"]),
    "ft_lora_resumed": Case("unsupervised_ft_llm", FT, before=FT),
    "ft_vision_linear": Case("unsupervised_ft_vlm", [*VLM, "task_encoder=linear", "batch_size=2", "N=4",
                                                     "num_iterations=2", "eval_freq=2"]),
    "dry_run_icl": Case("unsupervised_icl_llm", [*ICL, "dry_run=true"]),
    "dry_run_ft": Case("unsupervised_ft_llm", [*FT, "dry_run=true"]),
    "dry_run_api": Case("unsupervised_icl_llm", ["backend=openai", "model=openai_compatible", "model.name=tiny",
                                                 "model.pretrained={root}/tiny_llama", "label_mode=first",
                                                 "dataset.num_examples=12", "N=2", "T=1", "num_repeats=2",
                                                 "model.price_per_million_input_tokens=2.5", "dry_run=true"], api=True),
    "refused_unknown_dataset": Case("unsupervised_icl_llm", [*ICL, "dataset=sst3"], code=2),
    "refused_unknown_key": Case("unsupervised_icl_llm", [*ICL, "num_repeat=2"], code=2),
    "refused_N_above_pool": Case("unsupervised_icl_llm", [*ICL, "N=40"], code=2),
    "refused_duplicate_labels": Case("unsupervised_icl_llm", [*ICL, *OWN, "dataset.path={root}/notes.csv",
                                                                 "labelset.names=[positive,positive]"], code=2),
    "refused_missing_weights": Case("unsupervised_icl_llm", [*ICL, "model=gpt2"], code=2),
    "refused_ft_bad_range": Case("unsupervised_ft_llm", [*FT, "gamma=-1"], code=2),
    "gemma_sst2": Case("unsupervised_icl_llm", ["model=gemma3_270m", "model.dtype=float32", "device=cpu", "progress=false",
                                               "dataset.num_examples=24", "N=2", "T=1", "num_repeats=1",
                                               "save_predictions=true"], gemma=True),
}


# ------------------------------------------------------------------------------------------- the data
def sentences(rng, n: int, length: int = 6) -> list[str]:
    return [" ".join(rng.choice(WORDS, length)) for _ in range(n)]


def write_data(root: Path) -> None:
    """Every case's input under ``root``: a DATA_ROOT (``root/data``) and the user's own files."""
    rng = np.random.default_rng(0)
    data = root / "data"
    write_jsonl(data / "sst2" / "train.jsonl", [{"idx": i, "sentence": s, "label": i % 2}
                                                for i, s in enumerate(sentences(rng, 60))])
    for split, size in (("test", 7), ("validation", 3)):
        write_jsonl(data / "mmlu" / f"{split}.jsonl", [
            {"question": f"{subject} {i}: " + " ".join(rng.choice(WORDS, 5)), "subject": subject,
             "choices": list(rng.choice(WORDS, 4)), "answer": int(i % 4)}
            for subject in ("anatomy", "virology", "astronomy") for i in range(size + len(subject) % 3)])
    write_jsonl(data / "gsm8k" / "test.jsonl", [{"question": f"What is {i} plus {i + 1}?",
                                                  "answer": f"Add them.\n#### {2 * i + 1}"} for i in range(5)])
    for name, labelled in (("reviews.csv", True), ("notes.csv", False)):
        with open(root / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"] if labelled else ["text"])
            for i, text in enumerate(sentences(rng, 18)):
                writer.writerow([text, ("negative", "positive")[i % 2]] if labelled else [text])
    write_images(data / "cifar10" / "test.parquet", rng)


def write_images(path: Path, rng) -> None:
    """60 small random images in the hub's CIFAR schema (``img`` = {bytes, path}, ``label``)."""
    import datasets
    from PIL import Image

    def png(pixels) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    images = [png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(60)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"img": [{"bytes": b, "path": None} for b in images], "label": [i % 10 for i in range(60)]},
                               features=features).to_parquet(str(path))


# ------------------------------------------------------------------------------------------- the runs
def run_case(name: str, case: Case, root: Path, url: str | None) -> dict:
    """What the case's run leaves, normalised (see the module's docstring)."""
    run_dir = root / "runs" / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "JOINT_INFERENCE_CACHE": str(root / "cache" / name),
           "DATA_ROOT": str(SHARED_DATA if case.gemma else root / "data"), "OPENAI_API_KEY": "sk-golden"}

    def start(args):
        args = [a.replace("{root}", str(root)) for a in args] + ([f"model.base_url={url}"] if case.api else [])
        return subprocess.run([sys.executable, str(REPO / f"{case.script}.py"), *args, f"hydra.run.dir={run_dir}"],
                              check=False, capture_output=True, text=True, cwd=root, env=env, timeout=600)

    if case.before:
        first = start(case.before)
        assert first.returncode == 0, first.stderr[-3000:]
    done = start(case.args)
    out = {"exit_code": done.returncode,
           "errors": [line for line in done.stderr.splitlines() if line.startswith("error:")]}
    if "dry_run=true" in case.args:
        out["console"] = [line for line in done.stdout.splitlines() if line.strip()]
    for path in sorted(run_dir.rglob("*")) if run_dir.exists() else []:
        if path.name in OUTPUTS:
            out[str(path.relative_to(run_dir))] = read_output(path)
    return scrub(out, {str(root): "<ROOT>", str(REPO): "<REPO>", str(SHARED_DATA): "<SHARED_DATA>", url: "<SERVER>"})


def read_output(path: Path):
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".md":  # durations read <time>
        return [DURATION.sub("<time>", line) for line in text.splitlines()]
    return text.splitlines()


def scrub(value, paths: dict[str, str]):
    """``value`` without measured keys, with the temporary paths named."""
    if isinstance(value, dict):
        return {k: scrub(v, paths) for k, v in value.items() if not MEASURED.search(str(k).lower())}
    if isinstance(value, list):
        return [scrub(v, paths) for v in value]
    if isinstance(value, str):
        for path, name in sorted(paths.items(), key=lambda p: -len(p[0])):
            value = value.replace(path, name)
        return value
    return value


def same(got, want, where: str = "") -> list[str]:
    """Where ``got`` differs from ``want`` (floats to 1e-6 unless GOLDEN_EXACT=1)."""
    if isinstance(want, dict) and isinstance(got, dict):
        keys = list(dict.fromkeys([*want, *got]))
        return [d for k in keys for d in (same(got.get(k, "<absent>"), want.get(k, "<absent>"), f"{where}.{k}")
                                          if k in got and k in want else [f"{where}.{k}: only in {'got' if k in got else 'golden'}"])]
    if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in same(g, w, f"{where}[{i}]")]
    if (isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool) and not EXACT
            and type(got) is type(want)):
        return [] if math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6) else [f"{where}: {got!r} != {want!r}"]
    return [] if (got == want and type(got) is type(want)) else [f"{where}: {got!r} != {want!r}"[:400]]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, request) -> dict[str, dict]:
    """The outputs of every case selected (``-k``), two runs at a time (one torch thread each)."""
    from joint_inference.models.tiny import tiny_causal_lm
    from tests.openai_server import OpenAICompatibleServer

    root = tmp_path_factory.mktemp("golden")
    write_data(root)
    model, tokenizer = tiny_causal_lm("llama")
    model.save_pretrained(root / "tiny_llama")
    tokenizer.save_pretrained(root / "tiny_llama")
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.module.__name__ == __name__ and hasattr(item, "callspec")}
    cases = {n: c for n, c in CASES.items() if n in selected and (not c.gemma or (SHARED_DATA / "sst2").exists())}
    with (OpenAICompatibleServer(model=model, tokenizer=tokenizer, api_key="sk-golden", max_logprobs=400) as server,
          ThreadPoolExecutor(2) as pool):
        jobs = {name: pool.submit(run_case, name, case, root, server.url) for name, case in cases.items()}
        return {name: job.result() for name, job in jobs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_match_the_golden_files(outputs, name):
    if name not in outputs:
        pytest.skip("needs ../shared/data (real SST-2) and the embedded Gemma-3-270M")
    path = GOLDEN / f"{name}.json"
    if RECORD:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(outputs[name], indent=1, sort_keys=False) + "\n")
    want = json.loads(path.read_text())
    got = json.loads(json.dumps(outputs[name]))  # as the file holds it
    assert got["exit_code"] == CASES[name].code, got["errors"]
    differences = same(got, want)
    assert not differences, "\n".join(differences[:20])
