"""Typed settings: every shipped config passes, and each kind of bad value is refused by name."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from joint_inference.core.errors import ConfigError
from joint_inference.core.settings import (
    CausalLMSettings,
    ImageClassificationSettings,
    LocalDataSettings,
    MMLUSettings,
    OpenFlamingoSettings,
    TextClassificationSettings,
)
from joint_inference.runs.config import SCHEMAS, check_settings, config_option, dataset_schema, model_schema, options
from tests.conftest import REPO, compose, write_jsonl

EXPERIMENTS = {name: f"unsupervised_{'ft' if 'uft' in name else 'icl'}_{'vlm' if name.startswith('table3') else 'llm'}"
               for name in options("experiment")}
PRESETS = [("unsupervised_icl_llm", []), ("unsupervised_icl_vlm", []), ("unsupervised_ft_llm", []),
           ("unsupervised_ft_vlm", []), ("unsupervised_ft_vlm", ["task_encoder=linear"]),
           *[(script, [f"+experiment={name}"]) for name, script in EXPERIMENTS.items()]]


@pytest.mark.parametrize(("script", "overrides"), PRESETS)
def test_every_shipped_config_and_preset_passes(script, overrides):
    check_settings(compose(script, ["output_dir=/tmp/x", *overrides]), SCHEMAS[script])


def preset_groups(name: str) -> list[str]:
    """The group options a preset chooses (``override /model: x`` -> ``model=x``)."""
    entries = OmegaConf.load(f"{REPO}/configs/experiment/{name}.yaml").get("defaults", [])
    return [f"{k.removeprefix('override /')}={v}" for entry in entries for k, v in entry.items()]


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_preset_holds_only_what_differs_from_the_script(name):
    """Each key a preset sets changes the value the script has with the preset's model and data set."""
    script, groups = EXPERIMENTS[name], preset_groups(name)
    base = OmegaConf.to_container(compose(script, ["output_dir=/tmp/x", *groups]), resolve=True)
    own = OmegaConf.to_container(OmegaConf.load(f"{REPO}/configs/experiment/{name}.yaml"), resolve=False)
    own.pop("defaults", None)
    flat = lambda d, p="": [(k, v) for key, val in d.items() for k, v in (  # noqa: E731
        flat(val, f"{p}{key}.") if isinstance(val, dict) else [(f"{p}{key}", val)])]
    for key, value in flat(own):
        if isinstance(value, str) and "${" in value:
            continue  # an interpolation (max_norm: ${N}) says where the value comes from
        assert OmegaConf.select(OmegaConf.create(base), key) != value, f"{name} repeats {key}={value!r}"


CLASSIFICATION_PRESETS = [n for n in sorted(EXPERIMENTS) if EXPERIMENTS[n].endswith("llm") and config_option(
    "dataset", dict(g.split("=") for g in preset_groups(n)).get("dataset", "sst2")).kind == "classification"]


@pytest.mark.parametrize("name", CLASSIFICATION_PRESETS)
def test_every_classification_preset_dry_runs(name, tmp_path, capsys):
    """The preset's settings, counted on 300 SST-2-like rows with a tiny model's tokenizer (its own cannot be
    downloaded here): the plan has the preset's rounds (or steps) and nothing is written."""
    from joint_inference.runs.root import run_finetuning, run_icl

    script = EXPERIMENTS[name]
    rows = [{"idx": i, "sentence": f"a film number {i} of the year", "label": i % 2} for i in range(300)]
    write_jsonl(tmp_path / "data" / "sst2" / "train.jsonl", rows)
    cfg = compose(script, [f"+experiment={name}", "model=tiny_random_llm", f"dataset.data_root={tmp_path / 'data'}",
                           "dry_run=true", "device=cpu", f"output_dir={tmp_path / 'run'}"])
    check_settings(cfg, SCHEMAS[script])
    plan = (run_finetuning if script == "unsupervised_ft_llm" else run_icl)(cfg)["dry_run"]
    if script == "unsupervised_ft_llm":
        assert f"B={cfg.batch_size}, N={cfg.N}, {cfg.num_iterations} steps" in capsys.readouterr().out
    else:
        stages = [s["stage"] for s in plan["stages"]]
        assert f"round {cfg.T}" in stages and f"round {cfg.T + 1}" not in stages
        # the random-label control costs what its round costs: the test queries' share of round 1
        assert ("control: random labels" in stages) == ("random_labels" in cfg.controls)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("config_name", ["llama_sst2", "openflamingo_cifar100_of_lora"])
def test_the_originals_config_names_pass(config_name):
    script = "unsupervised_ft_llm" if config_name == "llama_sst2" else "unsupervised_ft_vlm"
    check_settings(compose(config_name, ["output_dir=/tmp/x"]), SCHEMAS[script])


API_MODELS = ["gpt-4o-2024-08-06", "openai_compatible"]


def script_of(group: str, option: str) -> str:
    """The entry script a model or data set option runs in."""
    cfg = config_option(group, option)
    image = "library" in cfg if group == "model" else cfg.modality == "image" and cfg.kind == "classification"
    return "unsupervised_icl_vlm" if image else "unsupervised_icl_llm"


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in ("model", "dataset") for o in options(g)])
def test_every_model_and_dataset_option_passes_its_schema(group, option):
    overrides = ["output_dir=/tmp/x", f"{group}={option}"] + (["backend=openai"] if option in API_MODELS else []) + (
        ["backend=openai", "model=openai_compatible"] if option.startswith("mmmu") else [])
    if group == "dataset" and option == "local":
        overrides += ["labelset.names=[a,b]", "template.text='{text} {y}'"]
    check_settings(compose(script_of(group, option), overrides), SCHEMAS[script_of(group, option)])


def test_each_option_holds_only_what_differs_from_its_base():
    """configs/<group>/<option>.yaml over its base: no key repeats the base's value."""
    for group in ("model", "dataset"):
        for option in options(group):
            own = OmegaConf.to_container(OmegaConf.load(f"{REPO}/configs/{group}/{option}.yaml"), resolve=False)
            bases = [b for b in own.pop("defaults", []) if isinstance(b, str) and b != "_self_"]
            inherited = OmegaConf.to_container(OmegaConf.merge(*(config_option(group, b) for b in bases)),
                                               resolve=False) if bases else {}
            assert bases, f"{group}/{option}.yaml extends no base"
            repeated = [k for k, v in own.items() if k in inherited and inherited[k] == v]
            assert not repeated, f"{group}/{option}.yaml repeats its base's {repeated}"


def test_the_schema_of_each_kind_of_option():
    kinds = {("model", "gemma3_270m"): CausalLMSettings, ("model", "openflamingo_4b"): OpenFlamingoSettings,
             ("dataset", "sst2"): TextClassificationSettings, ("dataset", "mmlu"): MMLUSettings,
             ("dataset", "cifar10"): ImageClassificationSettings, ("dataset", "local"): LocalDataSettings}
    for (group, option), schema in kinds.items():
        choose = model_schema if group == "model" else dataset_schema
        assert choose(config_option(group, option)) is schema, option


def test_an_option_lacking_a_key_of_its_kind_is_named():
    cfg = compose("unsupervised_icl_llm", ["output_dir=/tmp/x", "~dataset.label_column"])
    with pytest.raises(ConfigError, match="^dataset.label_column has no value: the dataset config"):
        check_settings(cfg, SCHEMAS["unsupervised_icl_llm"])


BAD = [  # (script, override, what the error must say)
    ("unsupervised_icl_llm", "forward_batch_size=-1", "forward_batch_size=-1 is out of range: it must be at least 1"),
    ("unsupervised_icl_llm", "forward_batch_size=many", "forward_batch_size='many': expected a number or auto"),
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
    ("unsupervised_ft_llm", "early_stopping.flip_rate_below=0", "early_stopping.flip_rate_below=0.0 is out of range: it must be above 0.0 and at most 1.0"),
    ("unsupervised_ft_llm", "early_stopping.flip_rate_below=1.5", "early_stopping.flip_rate_below=1.5 is out of range"),
    ("unsupervised_ft_llm", "N=1", "N=1 is out of range: it must be at least 2"),
    ("unsupervised_ft_llm", "estimator.name=bogus", "estimator.name='bogus' is not one of rao_marginalized, rao, naive"),
    ("unsupervised_ft_llm", "+estimator.beta=1", "unknown setting estimator.beta; the keys of estimator"),
    ("unsupervised_ft_vlm", "task_encoder=mlp", "task_encoder='mlp' is not one of lora, linear"),
    ("unsupervised_ft_llm", "backend=vllm", "backend='vllm' is not one of hf"),
    ("unsupervised_icl_llm", "dataset.num_examples=abc", "dataset.num_examples='abc': expected a whole number or null"),
    ("unsupervised_icl_llm", "dataset.num_examples=0", "dataset.num_examples=0 is out of range: it must be at least 1"),
    ("unsupervised_icl_llm", "dataset.on_bad_row=drop", "dataset.on_bad_row='drop' is not one of error, skip"),
    ("unsupervised_icl_llm", "+dataset.colour=red", "unknown setting dataset.colour; the keys of dataset"),
    ("unsupervised_icl_llm", "model.dtype=fp8", "model.dtype='fp8' is not one of auto, float32"),
    ("unsupervised_icl_llm", "model.tensor_parallel_size=0", "model.tensor_parallel_size=0 is out of range"),
    ("unsupervised_icl_vlm", "model=tiny_random_vlm model.library=jax", "model.library='jax' is not one of transformers, openflamingo"),
    ("unsupervised_icl_llm", "backend=openai", "backend=openai sends requests to a server: choose model=openai_compatible"),
    ("unsupervised_icl_llm", "model=openai_compatible", "model=openai_compatible is behind an API: add backend=openai"),
    ("unsupervised_icl_llm", "backend=openai model=openai_compatible api.concurrency=0", "api.concurrency=0 is out of range"),
    ("unsupervised_icl_vlm", "dataset.on_bad_image=ignore", "dataset.on_bad_image='ignore' is not one of stop, skip"),
]


@pytest.mark.parametrize(("script", "override", "message"), BAD)
def test_a_bad_value_is_refused_by_name(script, override, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        check_settings(compose(script, ["output_dir=/tmp/x", *override.split()]), SCHEMAS[script])


@pytest.mark.parametrize(("override", "where"), [
    ("template.text='${oc.env:HOME}: {sentence} It was {y}.'", "template.text"),
    ("labelset.names=[negative,'${oc.env:USER,someone}']", "labelset.names[1]"),
    ("model.name='${oc.env:HOME}'", "model.name"),
])
def test_a_template_label_or_name_may_not_call_a_resolver(override, where):
    """They are written into the prompts and results as they are: ${oc.env:...} would write the environment
    there. A reference to another key (GSM8K's zero-shot prompt is its prompt style's) is no resolver."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(where)}=.*calls a resolver"):
        check_settings(compose("unsupervised_icl_llm", ["output_dir=/tmp/x", override]), SCHEMAS["unsupervised_icl_llm"])
    check_settings(compose("unsupervised_icl_llm", ["output_dir=/tmp/x", "dataset=gsm8k"]),
                   SCHEMAS["unsupervised_icl_llm"])


@pytest.mark.parametrize(("override", "message"), [
    ("forward_batch_size=-1", "error: forward_batch_size=-1 is out of range"),
    ("Nn=3", "error: unknown setting 'Nn'; did you mean 'N'?"),  # without +: Hydra's "not in struct" otherwise
])
def test_the_command_line_says_error_and_exits_2_before_anything_loads(tmp_path, override, message):
    done = subprocess.run([sys.executable, str(REPO / "unsupervised_icl_llm.py"), override, "model=tiny_random_llm",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "run" / "state.json").exists()
