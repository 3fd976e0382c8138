"""Typed settings: every shipped config passes, and each kind of bad value is refused by name."""
from __future__ import annotations

import subprocess
import sys

import pytest

from joint_inference.errors import ConfigError
from joint_inference.settings import SCHEMAS, check_settings
from tests.conftest import REPO, compose

PRESETS = [("unsupervised_icl_llm", []), ("unsupervised_icl_vlm", []), ("unsupervised_ft_llm", []),
           ("unsupervised_ft_vlm", []), ("unsupervised_ft_vlm", ["task_encoder=linear"]),
           ("unsupervised_icl_llm", ["+experiment=quickstart"]), ("unsupervised_icl_llm", ["+experiment=table1_llama"]),
           ("unsupervised_icl_llm", ["+experiment=mmmu_gpt4o"]), ("unsupervised_ft_llm", ["+experiment=table1_uft_llama"])]


@pytest.mark.parametrize(("script", "overrides"), PRESETS)
def test_every_shipped_config_and_preset_passes(script, overrides):
    check_settings(compose(script, ["output_dir=/tmp/x", *overrides]), SCHEMAS[script])


@pytest.mark.parametrize("config_name", ["llama_sst2", "openflamingo_cifar100_of_lora"])
def test_the_originals_config_names_pass(config_name):
    script = "unsupervised_ft_llm" if config_name == "llama_sst2" else "unsupervised_ft_vlm"
    check_settings(compose(config_name, ["output_dir=/tmp/x"]), SCHEMAS[script])


BAD = [  # (script, override, what the error must say)
    ("unsupervised_icl_llm", "batch_size=-1", "batch_size=-1 is out of range: it must be at least 1"),
    ("unsupervised_icl_llm", "batch_size=many", "batch_size='many': expected a number or auto"),
    ("unsupervised_icl_llm", "N=abc", "N='abc': expected a whole number"),
    ("unsupervised_icl_llm", "N=0", "N=0 is out of range"),
    ("unsupervised_icl_llm", "protocol=orig", "protocol='orig' is not one of clean, original"),
    ("unsupervised_icl_llm", "label_mode=firstt", "label_mode='firstt' is not one of auto, first"),
    ("unsupervised_icl_llm", "supervised_icl=maybe", "supervised_icl='maybe': expected true or false"),
    ("unsupervised_icl_llm", "stop_when_flips_below=-0.1", "stop_when_flips_below=-0.1 is out of range"),
    ("unsupervised_icl_llm", "top_p=0", "top_p=0.0 is out of range: it must be above 0.0"),
    ("unsupervised_icl_llm", "+Nn=3", "unknown setting Nn"),
    ("unsupervised_icl_vlm", "support_sampling=global", "support_sampling='global' is not one of per_query, shared"),
    ("unsupervised_ft_llm", "forward_batch_size=0", "forward_batch_size=0 is out of range"),
    ("unsupervised_ft_llm", "eval_freq=0", "eval_freq=0 is out of range"),
    ("unsupervised_ft_llm", "ckpt_freq=0", "ckpt_freq=0 is out of range"),
    ("unsupervised_ft_llm", "optimization.lr=-1", "optimization.lr=-1.0 is out of range: it must be above 0.0"),
    ("unsupervised_ft_llm", "optimization.schedule=linear", "optimization.schedule='linear' is not one of"),
    ("unsupervised_ft_llm", "lora.r=0", "lora.r=0 is out of range"),
    ("unsupervised_ft_llm", "early_stopping.window=0", "early_stopping.window=0 is out of range"),
    ("unsupervised_ft_vlm", "task_encoder=mlp", "task_encoder='mlp' is not one of lora, linear"),
]


@pytest.mark.parametrize(("script", "override", "message"), BAD)
def test_a_bad_value_is_refused_by_name(script, override, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        check_settings(compose(script, ["output_dir=/tmp/x", override]), SCHEMAS[script])


@pytest.mark.parametrize(("override", "message"), [
    ("batch_size=-1", "error: batch_size=-1 is out of range"),
    ("Nn=3", "error: unknown setting 'Nn'; did you mean 'N'?"),  # without +: Hydra's "not in struct" otherwise
])
def test_the_command_line_says_error_and_exits_2_before_anything_loads(tmp_path, override, message):
    done = subprocess.run([sys.executable, str(REPO / "unsupervised_icl_llm.py"), override, "model=tiny_random_llm",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "state.json").exists()
