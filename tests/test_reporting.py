"""What a researcher reads: results.md and its intervals, the console, --help, templates typed on the
command line, and one line for an unreachable hub."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest

from joint_inference.reporting.results import markdown_table, wilson_interval
from joint_inference.runs.cli import OneHubRetryLine, key_meanings
from tests.conftest import REPO

SCRIPTS = ("unsupervised_icl_llm", "unsupervised_icl_vlm", "unsupervised_ft_llm", "unsupervised_ft_vlm")


# ---------------------------------------------------------------------------------- results.md
@pytest.mark.parametrize("successes,n,low,high", [  # Newcombe (1998), Stat. Med. 17:857, Table I, method 3
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_published_values(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)


def icl_results(**stage):
    return {"task": "sst2", "model": "m", "num_train": 200, "num_test": 100, "settings": {"num_repeats": 5},
            "zero_shot": {"test_accuracy": 0.56, **stage},
            "supervised_icl": None, "rounds": [{"round": 1, "test_accuracy": 0.77, **stage}],
            "timing": {"prompts_scored": 10, "seconds": 1.0}}


def test_results_md_gives_each_accuracy_its_interval_and_says_what_the_spread_is():
    table = markdown_table(icl_results(test_accuracy_mean=0.7, test_accuracy_std=0.02, train_accuracy=0.6))
    rows = [line for line in table.splitlines() if line.startswith("| zero-shot") or line.startswith("| unsup")]
    assert rows[0].split(" | ")[1:3] == ["56.0%", "46.2–65.3%"]  # Wilson for 56/100
    assert rows[1].split(" | ")[1:4] == ["77.0%", "67.8–84.2%", "70.0% ± 2.0"]
    assert "not a confidence interval" in table and "Wilson score interval" in table and "train accuracy" in table
    # columns a run does not have (generation tasks: no spread over votes, no train split) are left out
    plain = markdown_table(icl_results())
    assert "| stage | test accuracy | 95% interval |\n" in plain
    assert "mean ± std" not in plain and "train accuracy" not in plain


# --------------------------------------------------------------------------------------- --help
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_key_of_a_primary_config_says_what_it_means(name):
    meanings = key_meanings(REPO / "configs", name)
    assert {"N", "seed", "device", "output_dir"} <= set(meanings)
    assert not [key for key, meaning in meanings.items() if not meaning]


@pytest.mark.parametrize("name,present,absent", [
    ("unsupervised_icl_llm", ["gemma3_270m*", "gsm8k", "qwen_math", "+experiment: quickstart, table1_llama"],
     ["openflamingo_4b", "cifar10", "estimator", "table1_uft_llama"]),
    ("unsupervised_icl_vlm", ["openflamingo_4b*", "cifar100", "+experiment: table3_openflamingo\n"],
     ["gemma3_270m", "sst2", "estimator", "table1_llama", "table3_uft"]),
    ("unsupervised_ft_llm", ["estimator: naive, rao, rao_marginalized*", "trec_corrected", "table1_uft_llama"],
     ["gsm8k", "prompt_style", "openflamingo_4b", "quickstart", "table3"]),
    ("unsupervised_ft_vlm", ["estimator:", "tiny_random_vlm", "+experiment: table3_uft_openflamingo\n"],
     ["gemma3_270m", "sst2", "trec", "table1"]),
])
def test_help_lists_the_scripts_keys_and_the_options_that_apply_to_it(name, present, absent):
    done = subprocess.run([sys.executable, str(REPO / f"{name}.py"), "--help"], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    keys = text.split("Keys (key=value on the command line):\n")[1].split("\n\n")[0].splitlines()
    assert len(keys) == len(key_meanings(REPO / "configs", name))
    assert all(re.match(r"^  [\w.]+=\S*\s+\S", line) for line in keys), keys  # key=value, then its meaning
    groups = text.split("Config groups")[1]
    assert all(word in groups for word in present) and not any(word in groups for word in absent)


# ------------------------------------------------------------------------------- the command line
def test_a_run_ends_with_its_table_and_a_typed_newline_reaches_the_template(tiny_llama_dir, tiny_sst2_root, tmp_path):
    """Hydra keeps '\\n' in a quoted command-line value as backslash-n; the template gets a newline."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, str(REPO / "unsupervised_icl_llm.py"), f"model.pretrained={tiny_llama_dir}",
         "model.embedded=null", "model.name=tiny", f"dataset.data_root={tiny_sst2_root}", "dataset.num_examples=24",
         "N=2", "T=1", "num_repeats=1", "device=cpu", "progress=false", "template.text='{sentence}\\nIt was {y}.'",
         f"hydra.run.dir={out}"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "results.json").read_text())["settings"]["template"] == "{sentence}\nIt was {y}."
    assert done.stdout.rstrip().endswith((out / "results.md").read_text().rstrip())
    assert (out / "rounds.png").stat().st_size > 0
    log = (out / "unsupervised_icl_llm.log").read_text()
    for stage in ("zero-shot", "supervised ICL", "round 1"):
        assert re.search(rf"{stage}: test accuracy \d\.\d{{4}}", log), stage


def test_an_unreachable_hub_is_one_line(caplog, monkeypatch):
    """huggingface_hub's own retry loop, against a port nobody listens on: one warning, not two per retry."""
    from huggingface_hub import constants
    from huggingface_hub.utils._http import http_backoff

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)  # HF_HUB_OFFLINE=1 would refuse at once

    def attempt():
        caplog.clear()
        with pytest.raises(Exception, match="refused"):
            http_backoff("HEAD", "http://127.0.0.1:9/config.json", max_retries=3, base_wait_time=0, max_wait_time=0)
        return [r.getMessage() for r in caplog.records]

    caplog.set_level(logging.WARNING)
    assert len(attempt()) == 7  # without the filter: each of the 4 tries and 3 retries logs
    hub, quiet = logging.getLogger("huggingface_hub.utils._http"), OneHubRetryLine()
    hub.addFilter(quiet)
    try:
        said = attempt()
        assert len(said) == 1 and "cannot reach the Hugging Face hub" in said[0] and "refused" in said[0]
        hub.warning("something else")
        assert [r.getMessage() for r in caplog.records][-1] == "something else"
    finally:
        hub.removeFilter(quiet)


def test_a_state_recorded_with_the_models_config_as_written_resumes(tmp_path):
    """Earlier versions recorded the model's config unresolved (``pretrained: ${.name}``); such a run directory
    resumes, and a setting that really differs is still refused by name."""
    from joint_inference.core.errors import ConfigError
    from joint_inference.reporting.results import RunState

    model = {"name": "tiny", "pretrained": "tiny", "base_url": "http://127.0.0.1:1/v1"}
    written = {"fingerprint": {"task": "sst2", "model": {**model, "pretrained": "${.name}"}, "N": 2},
               "stages": {"zero_shot/test": {"test": [0, 1]}}, "seconds": 1.0, "prompts": 2}
    (tmp_path / "state.json").write_text(json.dumps(written))
    state = RunState(tmp_path / "state.json", {"task": "sst2", "model": model, "N": 2})
    assert "zero_shot/test" in state
    with pytest.raises(ConfigError, match=r"keys differ: \['N'\]"):
        RunState(tmp_path / "state.json", {"task": "sst2", "model": model, "N": 3})
    with pytest.raises(ConfigError, match=r"keys differ: \['model'\]"):
        RunState(tmp_path / "state.json", {"task": "sst2", "model": {**model, "name": "other"}, "N": 2})
