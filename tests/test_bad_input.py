"""Bad input, case by case: each is refused with an ``error: ...`` line that names the problem and
the fix, exit code 2 and no traceback, and leaves the run directory it was started in as it was,
byte for byte: results, state, ``.hydra`` (Hydra's log, which every start appends to, and what names
the last process to hold the directory, ``.run/lock`` and ``.run/running``, aside).

Each case starts from a copy of a finished run directory. The cases that need the real command line
(Hydra rewriting ``.hydra``, two processes, the checks made before Hydra starts) run the entry
scripts; the others call the run functions in this process, through the same ``error:`` handler.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from joint_inference.core.errors import exit_on_config_error
from joint_inference.models.tiny import WORDS
from joint_inference.runs.cli import check_command_line
from joint_inference.runs.rundir import run_directory
from tests.conftest import CONFIG_DIR, REPO, compose, write_jsonl

ICL = ["model.embedded=null", "model.name=tiny", "model.dtype=float32", "dataset.num_examples=12", "N=2", "T=1", "num_repeats=1",
       "device=cpu", "forward_batch_size=4", "progress=false"]
FT = ["model.embedded=null", "model.name=tiny", "model.dtype=float32", "device=cpu", "batch_size=2", "N=4", "num_iterations=2",
      "eval_freq=2", "ckpt_freq=2", "progress=false", "lora.r=4"]
ARGS = {"unsupervised_icl_llm": ICL, "unsupervised_ft_llm": FT}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two cores: a process each


def sst2_rows(n: int = 60) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"idx": i, "sentence": " ".join(WORDS[j] for j in torch.randint(len(WORDS), (6,), generator=g)),
             "label": i % 2} for i in range(n)]


def files(directory: Path, pattern: str = "**/*") -> dict[str, bytes]:
    """Each file under ``directory`` matching ``pattern``, with its bytes, but Hydra's logs and the last holder's."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.glob(pattern))
            if p.is_file() and p.suffix != ".log" and p.name != "lock" and p.parent.name != "running"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """{"icl": a finished run of unsupervised_icl_llm.py (the command line: .hydra and the directory's
    record), "ft": a finished fine-tuning run (2 steps, in this process), "data": their data root}."""
    root = tmp_path_factory.mktemp("finished")
    write_jsonl(root / "data" / "sst2" / "train.jsonl", sst2_rows())
    done = subprocess.run([sys.executable, str(REPO / "unsupervised_icl_llm.py"), *cli_args(
        "unsupervised_icl_llm", tiny_llama_dir, root / "data", root / "icl")], check=False, capture_output=True,
        text=True, cwd=root, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from joint_inference.runs.root import run_finetuning as run

    run(compose("unsupervised_ft_llm", [f"model.pretrained={tiny_llama_dir}", f"dataset.data_root={root / 'data'}",
                                        *FT, f"output_dir={root / 'ft'}"]))
    return {"icl": root / "icl", "ft": root / "ft", "data": root / "data"}


def cli_args(script: str, model_dir: Path, data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"model.pretrained={model_dir}", f"dataset.data_root={data_root}", *ARGS[script],
            f"hydra.run.dir={run_dir}", *extra]


class Attempt:
    """A case's run directory (a copy of a finished run), its data root (a copy of the good data, for the
    case to spoil), the files that must stay as they were (``kept``, a glob), and the exit code and stderr
    of the attempt that must be refused."""

    def __init__(self, run_dir: Path, model_dir: Path, data_root: Path, kept: str, capsys):
        self.run_dir, self.model_dir, self.data_root, self.kept = run_dir, model_dir, data_root, kept
        self.capsys = capsys
        self.data = data_root / "sst2" / "train.jsonl"
        self.code, self.stderr, self.before = None, "", {}

    def rows(self, changed: dict[int, dict]) -> None:
        """The good rows, with ``changed`` ({index: fields}) written over them."""
        rows = sst2_rows()
        for i, fields in changed.items():
            rows[i].update(fields)
        write_jsonl(self.data, rows)

    def call(self, fn, arg) -> None:
        """``fn(arg)`` in this process, as an entry script calls its run."""
        self.before = files(self.run_dir, self.kept)
        with pytest.raises(SystemExit) as stop:
            exit_on_config_error(fn, arg)
        self.code, self.stderr = stop.value.code, self.capsys.readouterr().err

    def icl(self, *overrides: str) -> None:
        from joint_inference.runs.root import run_icl as run

        self.call(run, compose("unsupervised_icl_llm", [f"model.pretrained={self.model_dir}",
                                                        f"dataset.data_root={self.data_root}", *ICL,
                                                        f"output_dir={self.run_dir}", *overrides]))

    def ft(self, *overrides: str) -> None:
        from joint_inference.runs.root import run_finetuning as run

        self.call(run, compose("unsupervised_ft_llm", [f"model.pretrained={self.model_dir}",
                                                       f"dataset.data_root={self.data_root}", *FT,
                                                       f"output_dir={self.run_dir}", *overrides]))

    def start(self, script: str, *overrides: str, **popen) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(REPO / f"{script}.py"), *cli_args(
            script, self.model_dir, self.data_root, self.run_dir, *overrides)], cwd=self.run_dir.parent, env=ENV,
            **popen)

    def cli(self, script: str, *overrides: str) -> None:
        self.before = files(self.run_dir, self.kept)
        done = self.start(script, *overrides, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr = done.communicate(timeout=300)[1]
        self.code = done.returncode


CASES = {}  # name: (attempt(Attempt), message fragments, base run ("icl" or "ft"), files that must stay)


def case(*fragments: str, base: str = "icl", kept: str = "**/*"):
    def register(attempt):
        CASES[attempt.__name__] = (attempt, fragments, base, kept)
        return attempt

    return register


def hold_directory(args) -> None:
    """Take and give back a run directory, as an entry script does around its run: ``args`` (directory, entry)."""
    with run_directory(*args, None):
        pass


# ------------------------------------------------------------------------- the run directory
@case("is in use by another run (pid ", "wait for it to end, or use another run directory", kept=".hydra/*")
def second_run_while_one_holds_the_directory(attempt):
    log = attempt.run_dir.parent / "holder.log"
    with log.open("w") as out:
        # the finished run's settings but many more rounds (T is not in a run's fingerprint): a run that goes on
        # holding the directory, where a change of the fingerprint's keys would soon be refused and end it
        holder = attempt.start("unsupervised_icl_llm", "T=100000", stdout=out, stderr=out)
    try:
        lock = attempt.run_dir / ".run" / "lock"
        for _ in range(600):
            assert holder.poll() is None, log.read_text()[-3000:]
            if f"pid {holder.pid} " in (lock.read_text() if lock.exists() else ""):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the first run never took the lock: {log.read_text()[-3000:]}")
        attempt.cli("unsupervised_icl_llm", "seed=3")
        assert f"pid {holder.pid} on " in attempt.stderr
        assert holder.poll() is None, log.read_text()[-3000:]  # it held the directory all along
    finally:
        holder.kill()
        holder.wait()
    hold_directory((attempt.run_dir, "unsupervised_icl_llm"))  # the killed run left no lock behind


@case("holds a run with a different configuration (keys differ: ['N'])", "use a new run directory")
def rerun_with_other_settings(attempt):
    attempt.cli("unsupervised_icl_llm", "N=3")


@case("holds the results of unsupervised_icl_llm.py; unsupervised_ft_llm.py does not add to them",
      "Use a new run directory")
def finetuning_into_an_icl_directory(attempt):
    attempt.cli("unsupervised_ft_llm")


@case("holds the results of unsupervised_icl_llm.py; unsupervised_icl_vlm.py does not add to them")
def vision_into_a_text_directory(attempt):
    attempt.call(hold_directory, (attempt.run_dir, "unsupervised_icl_vlm"))


@case("state.json is damaged", "Delete it to redo this run's stages from the start, or use a new run directory")
def truncated_state(attempt):
    state = attempt.run_dir / "state.json"
    state.write_bytes(state.read_bytes()[:100])
    attempt.icl()


@case("state.json is damaged", "Delete it")
def empty_state(attempt):
    (attempt.run_dir / "state.json").write_text("")
    attempt.icl()


@case("checkpoint.pt is damaged", "Delete it to train again from step 0, or use a new run directory", base="ft")
def truncated_checkpoint(attempt):
    checkpoint = attempt.run_dir / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5000])
    attempt.ft()


@case("checkpoint.pt loads but does not hold what this run's checkpoints hold (KeyError", "Delete it to train again",
      base="ft")
def checkpoint_without_its_optimizer(attempt):
    checkpoint = attempt.run_dir / "checkpoint.pt"
    saved = torch.load(checkpoint, weights_only=True)
    del saved["optimizer"]
    torch.save(saved, checkpoint)
    attempt.ft()


@case("checkpoint.pt loads but is not a checkpoint of this project", "Delete it to train again", base="ft")
def checkpoint_of_something_else(attempt):
    torch.save([1, 2, 3], attempt.run_dir / "checkpoint.pt")
    attempt.ft()


@case("has trained 2 steps, more than num_iterations=1", "set num_iterations to 2 or more", base="ft")
def fewer_iterations_than_done(attempt):
    attempt.ft("num_iterations=1")


# ---------------------------------------------------------------------------------- the data
@case("row 5 of ", "sst2/train.jsonl cannot be scored: its field 'sentence' is null (1 of 60 rows",
      "or leave such rows out with dataset.on_bad_row=skip")
def null_field(attempt):
    attempt.rows({5: {"sentence": None}})
    attempt.icl()


@case("row 7 of ", "its field 'sentence' is empty")
def empty_field(attempt):
    attempt.rows({7: {"sentence": "  "}})
    attempt.icl()


@case("row 0 of ", "its field 'sentence' is int 0, not text (60 of 60 rows")
def number_in_a_text_field(attempt):
    attempt.rows({i: {"sentence": i} for i in range(60)})
    attempt.icl()


@case("row 3 of ", "alone it is ", "tokens, more than the model's context of 2048")
def example_longer_than_the_context(attempt):
    attempt.rows({3: {"sentence": " ".join(WORDS[i % len(WORDS)] for i in range(2500))}})
    attempt.icl()


@case("sst2/train.jsonl is empty", "repair or re-export the file")
def empty_file(attempt):
    attempt.data.write_text("")
    attempt.icl()


@case("sst2/train.jsonl, line 60: not a JSON object (the file ends in the middle of it: cut short?)")
def truncated_jsonl(attempt):
    attempt.data.write_bytes(attempt.data.read_bytes()[:-20])
    attempt.icl()


@case("sst2/train.jsonl, line 3: not UTF-8", "re-save the file as UTF-8")
def not_utf8(attempt):
    lines = attempt.data.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"sentence", b"sent\xe9nce")
    attempt.data.write_bytes(b"".join(lines))
    attempt.icl()


# -------------------------------------------------------------------- labels and templates
@case("label 0 of the label set is '', not a name", "quote names")
def empty_label(attempt):
    attempt.icl("labelset.names=['',positive]")


@case("label 0 of the label set is 1, not a name", "labelset.names=['1','2']")
def number_as_label(attempt):
    attempt.icl("labelset.names=[1,2]")


@case("has unbalanced braces", "write a literal brace as {{ or }}")
def unbalanced_braces(attempt):
    attempt.icl('template.text="{sentence\nIt was {y}."')


@case("template '{y}' has no text before '{y}'", "the example goes first")
def template_of_only_the_label(attempt):
    attempt.icl('template.text="{y}"')


# ------------------------------------------------------------------------- the environment
@case("device=cuda, but this machine has no CUDA GPU", "use device=auto or device=cpu")
def cuda_without_a_gpu(attempt):
    attempt.icl("device=cuda")


@case("holds files that no run of this project wrote (", "results.json", "Use a new or empty run directory",
      kept="*.*")
def files_of_the_users_in_the_run_directory(attempt):
    shutil.rmtree(attempt.run_dir / ".run")  # what is there now, no run of this project recorded writing
    attempt.cli("unsupervised_icl_llm")


@case("lies in the run directory", "copy the file elsewhere and point dataset.path at the copy")
def own_file_in_the_run_directory(attempt):
    write_jsonl(attempt.run_dir / "mine.jsonl", [{"text": r["sentence"]} for r in sst2_rows(12)])
    attempt.icl("dataset=local", f"dataset.path={attempt.run_dir / 'mine.jsonl'}", "labelset.names=[bad,good]",
                "template.text='{text} It was {y}.'")


@case("could not load model '/a/local/path/that/does/not/exist': no such file or directory",
      "Point it at a folder holding config.json")
def model_path_that_does_not_exist(attempt):
    attempt.icl("model.pretrained=/a/local/path/that/does/not/exist")


@case("cannot write the output directory", "(Not a directory); choose another one with hydra.run.dir=")
def output_dir_that_cannot_be_created(attempt):
    attempt.call(hold_directory, (attempt.run_dir / "results.json" / "run", "unsupervised_icl_llm"))


@case("cannot be created: ", "results.json is a file; choose another hydra.run.dir")
def run_dir_that_cannot_be_created(attempt):
    attempt.call(lambda args: check_command_line(args, Path(CONFIG_DIR)),
                 [f"hydra.run.dir={attempt.run_dir / 'results.json' / 'run'}"])


@case("unknown dataset 'no_such_task'; valid: ag_news, ", "sst2")
def unknown_dataset(attempt):
    attempt.cli("unsupervised_icl_llm", "dataset=no_such_task")


@case("unknown model 'no_such_model'; valid: ", "gemma3_270m")
def unknown_model(attempt):
    attempt.call(lambda args: check_command_line(args, Path(CONFIG_DIR)), ["-m", "model=gpt2,no_such_model"])


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_and_changes_nothing(name, finished, tiny_llama_dir, tmp_path, capsys):
    attempt_case, fragments, base, kept = CASES[name]
    if name == "cuda_without_a_gpu" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    attempt = Attempt(tmp_path / "run", tiny_llama_dir, tmp_path / "data", kept, capsys)
    shutil.copytree(finished[base], attempt.run_dir)
    shutil.copytree(finished["data"], attempt.data_root)
    attempt_case(attempt)
    assert attempt.code == 2, attempt.stderr[-3000:]
    assert "error: " in attempt.stderr and "Traceback" not in attempt.stderr, attempt.stderr[-3000:]
    for fragment in fragments:
        assert fragment in attempt.stderr, attempt.stderr[-3000:]
    assert attempt.before and files(attempt.run_dir, kept) == attempt.before


def test_rows_that_cannot_be_scored_are_left_out_and_counted(finished, tiny_llama_dir, tmp_path):
    """dataset.on_bad_row=skip: the run samples among the good rows and results.json says how many it left out."""
    from joint_inference.runs.root import run_icl as run

    rows = sst2_rows()
    rows[5]["sentence"] = None
    rows[9]["sentence"] = " ".join(WORDS[i % len(WORDS)] for i in range(2500))
    write_jsonl(tmp_path / "data" / "sst2" / "train.jsonl", rows)
    run(compose("unsupervised_icl_llm", [f"model.pretrained={tiny_llama_dir}", f"dataset.data_root={tmp_path / 'data'}",
                                         *ICL, f"output_dir={tmp_path / 'run'}", "dataset.on_bad_row=skip"]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["skipped_rows"] == 2 and results["num_train"] + results["num_test"] == 12
