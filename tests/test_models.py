"""Model loading: what transformers and bitsandbytes are asked for (loading real weights is the slow tier's and,
for 4-bit, the GPU kit's)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf

import joint_inference.models.language as models
from joint_inference.core.errors import ConfigError
from joint_inference.runs.config import config_option

REAL_PROBE = models.cpu_has_bf16_matmul  # before the tests' fixture sets auto to fp32 (conftest.py)


def test_load_in_4bit_asks_transformers_for_nf4_weights_placed_on_the_gpu(monkeypatch):
    """model.load_in_4bit: QLoRA's NF4 + double quantization computing in model.dtype, placed by bitsandbytes on
    the run's GPU (device_map; never moved with .to() after). On a CPU, or without bitsandbytes, a clear error
    comes before any weights load. (Loading itself needs CUDA: the GPU kit's business.)"""
    cfg = OmegaConf.merge(config_option("model", "llama3.1_8b"), {"load_in_4bit": True, "dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="needs a CUDA GPU .* drop model.load_in_4bit"):
        models.load_model(cfg, torch.device("cpu"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"pip install -e \".\[qlora\]\""):
        models.load_model(cfg, torch.device("cuda", 1))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else
                        find_spec(name, *a))

    class Loaded:
        moved = False

        def to(self, *args, **kwargs):
            Loaded.moved = True
            return self

        def eval(self):
            return self

        def requires_grad_(self, flag):
            return self

    calls = []
    monkeypatch.setattr(models, "load_tokenizer", lambda cfg: "tokenizer")
    monkeypatch.setattr(models, "resolve_weights", lambda cfg: ("meta-llama/Llama-3.1-8B", None))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kwargs: calls.append((source, kwargs)) or Loaded())
    monkeypatch.setattr(models, "resolve_attention", lambda name, device: "sdpa")
    _, tokenizer = models.load_model(cfg, torch.device("cuda", 1))
    (source, kwargs), = calls
    q = kwargs["quantization_config"]
    assert (source, tokenizer, kwargs["device_map"], kwargs["dtype"]) == ("meta-llama/Llama-3.1-8B", "tokenizer",
                                                                         {"": 1}, torch.bfloat16)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (
        True, "nf4", True, torch.bfloat16)
    assert not Loaded.moved
    with pytest.raises(ConfigError, match="random_init"):
        models.load_model(OmegaConf.merge(config_option("model", "tiny_random_llm"), {"load_in_4bit": True}),
                          torch.device("cuda", 0))


# ------------------------------------------------------------------------------------ dtype on CPUs
@pytest.mark.parametrize("units, want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bf16_on_cpus_with_bf16_matrix_units_only(monkeypatch, units, want):
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: units)
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == want
    assert models.resolve_dtype("float32", cpu) == torch.float32  # the exact path, asked for
    assert models.compute_dtype(OmegaConf.create({"dtype": "auto"}), "hf", cpu) == str(want).removeprefix("torch.")
    assert models.compute_dtype(OmegaConf.create({"dtype": "auto"}), "openai", cpu) is None  # the server's
    # runs written before the dtype was recorded computed in fp32 on every CPU under auto
    assert models.dtype_before_recorded(OmegaConf.create({"dtype": "auto"}), "hf", cpu) == "float32"
    assert models.dtype_before_recorded(OmegaConf.create({"dtype": "bfloat16"}), "hf", cpu) == "bfloat16"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_the_cpu_probe_reads_torchs_report_of_the_processor():
    flags = Path("/proc/cpuinfo").read_text().split()
    assert REAL_PROBE() == ("amx_bf16" in flags or "avx512_bf16" in flags)


def tiny_run(model_dir, data_root, out_dir, *extra):
    from tests.conftest import compose

    return compose("unsupervised_icl_llm", [
        f"model.pretrained={model_dir}", "model.embedded=null", "model.name=tiny_llama", "dataset=sst2",
        f"dataset.data_root={data_root}", "dataset.num_examples=24", "N=2", "T=1", "num_repeats=1",
        "device=cpu", "progress=false", f"output_dir={out_dir}", *extra])


def test_a_run_records_its_dtype_and_never_resumes_in_another(tiny_llama_dir, tiny_sst2_root, tmp_path, monkeypatch):
    """auto on a CPU with bf16 units runs in bf16, says so in results.json, and a restart where the same command
    computes in fp32 (a machine without them) is refused, naming the dtype; a state file written before the dtype was recorded
    resumes where auto meant what it means now (fp32), and is refused where it now means bf16."""
    import json

    from joint_inference.runs.root import run_icl as run

    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: True)
    results = run(tiny_run(tiny_llama_dir, tiny_sst2_root, tmp_path / "bf16"))
    assert results["settings"]["dtype"] == "bfloat16"
    state = json.loads((tmp_path / "bf16" / "state.json").read_text())
    assert state["fingerprint"]["dtype"] == "bfloat16"
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: False)  # the same command where auto means fp32
    with pytest.raises(ConfigError, match=r"keys differ: \['dtype'\]"):
        run(tiny_run(tiny_llama_dir, tiny_sst2_root, tmp_path / "bf16"))
    assert json.loads((tmp_path / "bf16" / "state.json").read_text()) == state  # nothing changed
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: True)
    assert run(tiny_run(tiny_llama_dir, tiny_sst2_root, tmp_path / "bf16"))["rounds"] == results["rounds"]

    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: False)
    fp32 = run(tiny_run(tiny_llama_dir, tiny_sst2_root, tmp_path / "old"))
    assert fp32["settings"]["dtype"] == "float32"
    old = json.loads((tmp_path / "old" / "state.json").read_text())
    del old["fingerprint"]["dtype"]  # as an earlier version wrote it
    (tmp_path / "old" / "state.json").write_text(json.dumps(old))
    assert run(tiny_run(tiny_llama_dir, tiny_sst2_root, tmp_path / "old"))["rounds"] == fp32["rounds"]
    (tmp_path / "old" / "state.json").write_text(json.dumps(old))
    monkeypatch.setattr(models, "cpu_has_bf16_matmul", lambda: True)
    with pytest.raises(ConfigError, match=r"keys differ: \['dtype'\]"):
        run(tiny_run(tiny_llama_dir, tiny_sst2_root, tmp_path / "old"))


def test_a_bf16_model_reads_its_labels_in_fp32(tiny_llama):
    """The label read-out of a bf16 model: its final hidden states times the label rows of the output matrix,
    in fp32 (a slow reference: one prompt at a time, the model's own hidden states); a bf16 read-out
    would differ by bf16's rounding of the logits."""
    import copy

    from joint_inference.prompts.templates import PromptEncoder, Template
    from joint_inference.scoring.scorer import Scorer

    model, tokenizer = tiny_llama
    model = copy.deepcopy(model).to(torch.bfloat16)
    encoder = PromptEncoder(tokenizer, Template("{sentence} It was {y}."), ["bad", "good"])
    rows = [{"sentence": s} for s in ("the plot was fine", "boring and bad", "love the actors", "very good film")]
    enc = encoder.encode_all(rows)
    prompts, labels = [enc[:3], enc[3:4], enc[1:4]], [[0, 1], [], [1, 0]]
    with torch.no_grad():
        got = Scorer(model, encoder, "first", batch_size=2, show_progress=False).label_logprobs(prompts, labels)
        columns = [ids[0] for ids in encoder.label_ids]
        head = model.get_output_embeddings().weight[columns].float()
        for i, (prompt, labs) in enumerate(zip(prompts, labels)):
            ids, positions = encoder.assemble(prompt, labs)
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0, positions[-1]]
            want = torch.log_softmax(hidden.float() @ head.T, -1)
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
