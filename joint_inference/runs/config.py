"""Hydra's composed configuration read into the typed settings of ``joint_inference.core.settings``.

The composition root calls :func:`read_settings` once: each key is checked against the script's schema,
and the ``model``, ``dataset``, ``template``, ``labelset``, ``prompt_style`` and ``estimator`` groups against
theirs (chosen by the option's kind: :func:`model_schema`, :func:`dataset_schema`, :func:`template_schema`),
so that a key the script does not have, a value of the wrong type, a choice outside the listed ones, a
number out of range and a key a config lacks each stop the run with ``error:`` naming the key, before
anything is loaded or written. What it returns is what every layer below receives; no module below
``joint_inference.runs`` reads the configuration.
"""
from __future__ import annotations

import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from ..core import settings as schemas
from ..core.errors import ConfigError
from ..core.settings import (
    APIModelSettings,
    CausalLMSettings,
    ClassificationTemplate,
    EstimatorSettings,
    FTSettings,
    GenerationSettings,
    GenerationTemplate,
    ICLSettings,
    ImageClassificationSettings,
    LabelSetSettings,
    LMEvalSettings,
    LocalDataSettings,
    MMLUSettings,
    MMMUSettings,
    MMMUTemplate,
    OpenFlamingoSettings,
    PromptStyleSettings,
    TextClassificationSettings,
    TextICLSettings,
    VisionFTSettings,
    VisionLMSettings,
)

# the config groups, each read by the schema of the option chosen, in the order they are checked
OPTIONS = ("model", "dataset", "template", "labelset", "estimator", "prompt_style")
GROUPS = (*OPTIONS, "hydra")  # not the script's own keys
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
RESOLVER_CALL = re.compile(r"\$\{[^}]*:")  # ${oc.env:HOME}: a resolver's call, not a reference to another key
# what to do where a key reads a group that the config lacks
UNRESOLVED_HINTS = {"prompt_style": "; GSM8K's prompts come from the prompt_style group: keep `- prompt_style: "
                                    "cot_wei2022` in the defaults list (choices: cot_wei2022, qwen_math)"}
SCHEMAS = {"unsupervised_icl_llm": TextICLSettings, "unsupervised_icl_vlm": ICLSettings,
           "unsupervised_ft_llm": FTSettings, "unsupervised_ft_vlm": VisionFTSettings}


# ------------------------------------------------------------------------------ reading the settings
def read_settings(cfg: DictConfig, schema: type | None = None):
    """``cfg`` checked (:func:`check_settings`) and read into ``schema`` (by default the one of the script
    whose keys ``cfg`` has, :func:`script_schema`), each group into its own schema."""
    schema = schema or script_schema(cfg)
    check_settings(cfg, schema)
    values = {key: plain(cfg[key]) for key in cfg if key not in GROUPS}
    for name in OPTIONS:
        if name in cfg:
            values[name] = to_settings(group_schema(name, cfg), plain(cfg[name]))
    return to_settings(schema, values)


def read_model(model: DictConfig):
    """One model config (``config_option("model", ...)``, a run's ``cfg.model``) as its typed settings."""
    schema = model_schema(model)
    check_node(model, schema, "model.")
    return to_settings(schema, plain(model))


def read_dataset(dataset: DictConfig):
    """One dataset config as its typed settings."""
    schema = dataset_schema(dataset)
    check_node(dataset, schema, "dataset.")
    return to_settings(schema, plain(dataset))


def own_keys(schema: type) -> list[str]:
    """The keys a script's config sets itself (its groups aside)."""
    return [spec.name for spec in fields(schema) if spec.name not in GROUPS]


def script_schema(cfg: DictConfig) -> type:
    """The schema of the entry script whose config ``cfg`` is: the text ICL script has the API's keys, the
    fine-tuning scripts an estimator (the vision one an optimiser per task encoder)."""
    if "estimator" in cfg:
        return VisionFTSettings if "optimizers" in cfg else FTSettings
    return TextICLSettings if "api" in cfg else ICLSettings


def group_schema(name: str, cfg: DictConfig) -> type:
    return {"model": lambda: model_schema(cfg.model), "dataset": lambda: dataset_schema(cfg.dataset),
            "template": lambda: template_schema(cfg.dataset), "labelset": lambda: LabelSetSettings,
            "prompt_style": lambda: PromptStyleSettings, "estimator": lambda: EstimatorSettings}[name]()


def plain(value):
    """A config value as plain Python (containers resolved)."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value


def to_settings(schema: type, values: dict):
    """``schema`` holding ``values`` as they were composed (checked before), nested blocks as their dataclasses."""
    hints = typing.get_type_hints(schema, vars(schemas))
    given = {}
    for spec in fields(schema):
        if spec.name not in values:
            continue
        value = values[spec.name]
        nested = next((t for t in (hints[spec.name], *typing.get_args(hints[spec.name])) if is_dataclass(t)), None)
        given[spec.name] = to_settings(nested, value) if nested and isinstance(value, dict) else value
    return schema(**given)


# ------------------------------------------------------------------------------ which schema
def model_schema(model: DictConfig) -> type:
    """Which kind of model a model config describes: a vision-language model names its ``library``, a
    model behind an API its ``base_url``."""
    if "library" in model:
        return OpenFlamingoSettings if model.library == "openflamingo" else VisionLMSettings
    return APIModelSettings if "base_url" in model else CausalLMSettings


def dataset_schema(dataset: DictConfig) -> type:
    """Which kind of data set a dataset config describes (its ``kind`` and ``modality``; a file of the
    user's names its ``path``; MMLU lists its ``subjects``)."""
    if "path" in dataset:
        return LocalDataSettings
    if "include_path" in dataset:
        return LMEvalSettings
    if dataset.kind != "classification":
        return GenerationSettings if dataset.kind == "generation" else MMMUSettings
    if dataset.modality == "image":
        return ImageClassificationSettings
    return MMLUSettings if "subjects" in dataset else TextClassificationSettings


def template_schema(dataset: DictConfig) -> type:
    """A template fits its data set's kind: one text for classification, chain-of-thought prompts for
    generation, a system message and an instruction per question type for MMMU."""
    return {"classification": ClassificationTemplate, "generation": GenerationTemplate,
            "mmmu": MMMUTemplate}[dataset.kind]


def config_option(group: str, option: str, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """One option of a config group as Hydra composes it: its file over the bases its defaults list
    names (``_causal_lm``, ...), interpolations unresolved. For --help, benchmarks and tests that read
    one option without composing a whole run."""
    cfg = OmegaConf.load(config_dir / group / f"{option}.yaml")
    bases = [entry for entry in cfg.pop("defaults", []) if isinstance(entry, str) and entry != "_self_"]
    return OmegaConf.merge(*(config_option(group, base, config_dir) for base in bases), cfg)


def options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The options a user may choose for ``group=`` (a base, ``_name.yaml``, is not one)."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml") if not p.stem.startswith("_"))


# ------------------------------------------------------------------------------ the checks
def check_settings(cfg: DictConfig, schema: type) -> None:
    """``cfg``'s own keys checked against the script's ``schema``, then that the model fits the backend
    (behind an API exactly when ``backend=openai``), then each group against its schema: unknown keys,
    types, choices, ranges and keys the config lacks."""
    check_node(cfg, schema, "", skip=GROUPS)
    check_written_as_is(cfg)
    behind_api = model_schema(cfg.model) is APIModelSettings
    if (cfg.backend == "openai") != behind_api:
        raise ConfigError(f"model={cfg.model.name} is behind an API: add backend=openai" if behind_api else
                          "backend=openai sends requests to a server: choose model=openai_compatible (with "
                          "model.name=... model.base_url=...) or model=gpt-4o-2024-08-06")
    for name in OPTIONS:
        if name in cfg:  # fine-tuning alone has an estimator, the text scripts a prompt style
            check_node(cfg[name], group_schema(name, cfg), f"{name}.")


def check_written_as_is(cfg: DictConfig) -> None:
    """A template, a label name and a model's or data set's name reach the prompts and the results as they are
    written, so none may call a resolver: ``${oc.env:HOME}`` would write the environment into them. (A
    reference to another key, ``${prompt_style.zero_shot}``, is text of the config itself.)"""
    for where, only in (("template", None), ("labelset", None), ("model", "name"), ("dataset", "name")):
        if where not in cfg:
            continue
        value = OmegaConf.to_container(cfg[where], resolve=False)
        if only:
            value = {only: value.get(only)}
        for path, text in texts_of(value, where):
            if RESOLVER_CALL.search(text):
                raise ConfigError(f"{path}={text!r} calls a resolver: a template, a label or a name is written into "
                                  "the prompts and the results as it is, so write its text itself")


def texts_of(value, path: str):
    """(path, text) of every string in a plain config value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from texts_of(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from texts_of(item, f"{path}[{i}]")
    elif isinstance(value, str):
        yield path, value


def check_node(node: DictConfig, schema: type, prefix: str, skip=()) -> None:
    """The keys of ``node`` (``prefix`` names it in messages) checked against ``schema``; a key whose
    interpolation fails (``optimization: ${optimizers.${task_encoder}}`` of an unknown encoder) is named
    last, so that a key the user set wrongly is the one named."""
    own, unresolved = {}, {}
    for key in node:
        if key in skip:
            continue
        try:
            value = node[key]
            own[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
        except OmegaConfBaseException as err:
            unresolved[key] = err
    names = {f.name for f in fields(schema)} - set(skip)
    unknown = sorted(set(own) - names)
    if unknown:
        where = (f"the settings of this script: {', '.join(sorted(names))} (and the groups {', '.join(skip[:-1])})"
                 if not prefix else f"the keys of {prefix.rstrip('.')} ({schema.__doc__.split(':')[0]}): "
                 f"{', '.join(sorted(names))}")
        raise ConfigError(f"unknown setting {', '.join(prefix + k for k in unknown)}; {where}")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), own)
    except ValidationError as err:
        key = err.full_key or "?"
        raise ConfigError(f"{prefix}{key}={err.value!r}: expected {_expected(schema, key)}") from None
    lacking = sorted(k for k in OmegaConf.missing_keys(typed) if k.split(".")[0] not in unresolved)
    if lacking:
        where = (f"the {prefix.rstrip('.')} config (or the base it extends, {schema.__doc__.split(':')[0]})"
                 if prefix else "the script's config (configs/<script>.yaml)")
        raise ConfigError(f"{prefix}{lacking[0]} has no value: {where} must set it")
    check_values(typed, schema, prefix)
    for key, err in unresolved.items():
        hint = next((h for name, h in UNRESOLVED_HINTS.items() if name in err.msg), "")
        raise ConfigError(f"{prefix}{key} cannot be read: {err.msg}{hint}")


def _expected(schema: type, key: str) -> str:
    """The type a dotted ``key`` of ``schema`` holds, in words."""
    for part in key.split("."):
        spec = {f.name: f for f in fields(schema)}.get(part)
        if spec is None:
            return "another type"
        schema = spec.type if isinstance(spec.type, type) else vars(schemas).get(str(spec.type), str)
    words = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text", "None": "null"}
    return " or ".join(words.get(t.strip(), t.strip()) for t in str(spec.type).split("|"))


def check_values(settings: DictConfig, schema: type, prefix: str) -> None:
    """Choices and ranges of ``settings`` (typed by ``schema``) and of the dataclasses inside it; keys
    without a value (whose interpolation failed) are left to the caller."""
    for spec in fields(schema):
        key = f"{prefix}{spec.name}"
        if OmegaConf.is_missing(settings, spec.name):
            continue
        value = settings[spec.name]
        if isinstance(value, DictConfig) and OmegaConf.get_type(value) not in (dict, None):
            check_values(value, OmegaConf.get_type(value), f"{key}.")
            continue
        meta = spec.metadata
        if value is None or value in meta.get("words", ()):
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(meta['choices'])}")
        if "low" in meta:
            if isinstance(value, (str, bool)):
                raise ConfigError(f"{key}={value!r}: expected a number"
                                  + (f" or {', '.join(meta['words'])}" if meta.get("words") else ""))
            too_high = meta["high"] is not None and value > meta["high"]
            if value < meta["low"] or (meta["above"] and value == meta["low"]) or too_high:
                bound = f"above {meta['low']}" if meta["above"] else f"at least {meta['low']}"
                bound += f" and at most {meta['high']}" if meta["high"] is not None else ""
                raise ConfigError(f"{key}={value!r} is out of range: it must be {bound}")
