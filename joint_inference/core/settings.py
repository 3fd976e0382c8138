"""Typed settings: the keys of each entry script and of each kind of model and data set, checked once before any model loads.

Hydra composes the YAML files; :func:`check_settings` then reads the composed configuration's own
keys into the script's dataclass, and the ``model`` and ``dataset`` groups into theirs (one per kind of
model and of data set, chosen by :func:`model_schema` and :func:`dataset_schema`), so that a key the
script does not have, a value of the wrong type, a choice outside the listed ones, a number out of range
and a key a config lacks each stop the run with ``error:`` naming the key, before anything is loaded or
written. The library then reads every key directly (``cfg.dataset.num_examples``), never with a default
of its own.

The YAML files hold the values, with a comment per key (``--help`` prints them): a group's options
extend a base (``configs/dataset/_text_classification.yaml``, ``configs/model/_causal_lm.yaml``, ...)
and hold only what differs from it. The group dataclasses hold no values, only what each key may hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING, Container, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from .errors import ConfigError
from ..methods.estimators import ESTIMATORS

GROUPS = ("model", "dataset", "template", "labelset", "estimator", "prompt_style", "hydra")  # not the script's own keys
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
LABEL_MODES = ("auto", "first", "bot", "bot_minimal", "exact")


def key(*options, low=None, above: bool = False, high=None, words: tuple[str, ...] = ()):
    """A key without a value of its own (the YAML gives it) that holds one of ``options``, or a number of
    at least (``above``: more than) ``low`` and at most ``high``, or one of ``words`` in place of that
    number."""
    meta = {"choices": options} if options else {}
    if low is not None:
        meta.update(low=low, above=above, high=high)
    return field(default=MISSING, metadata={**meta, **({"words": words} if words else {})})


def group(schema: type):
    """A nested block of keys (``optimization:``, ``lora:``) typed by ``schema``."""
    return field(default_factory=schema)


@dataclass
class Settings:
    """What every entry script has."""

    seed: int = key()
    device: str = key()
    label_mode: str = key(*LABEL_MODES)
    progress: bool = key()
    output_dir: str = key()
    dry_run: bool = key()
    allow_long_cpu_run: bool = key()
    backend: str = key("hf")  # who runs the model: transformers in this process


@dataclass
class ICLSettings(Settings):
    """unsupervised_icl_vlm.py; with TextICLSettings's keys, unsupervised_icl_llm.py."""

    N: int = key(low=1)
    T: int = key(low=0)
    stop_when_flips_below: float | None = key(low=0.0)
    num_repeats: int = key(low=1)
    forward_batch_size: int | str = key(low=1, words=("auto",))
    support_sampling: str = key("per_query", "shared")
    protocol: str = key("clean", "original")
    block_size: int = key(low=1)
    supervised_icl: bool = key()
    save_predictions: bool = key()


@dataclass
class APISettings:
    """How requests to a model behind an API are sent (backend=openai)."""

    concurrency: int = key(low=1)
    timeout_s: float = key(low=0.0, above=True)
    max_retries: int = key(low=0)
    backoff_s: float = key(low=0.0)
    max_backoff_s: float = key(low=0.0)
    cache_dir: str | None = key()
    dry_run_output_tokens: int = key(low=1)


@dataclass
class TextICLSettings(ICLSettings):
    """unsupervised_icl_llm.py: other backends, and generation tasks."""

    backend: str = key("hf", "vllm", "openai")
    temperature: float = key(low=0.0)
    top_p: float = key(low=0.0, above=True)
    max_new_tokens: int = key(low=1)
    api: APISettings = group(APISettings)


@dataclass
class Optimization:
    lr: float = key(low=0.0, above=True)
    schedule: str = key("constant", "cosine")
    warmup_steps: int = key(low=0)
    min_lr: float = key(low=0.0)


@dataclass
class LoRA:
    r: int = key(low=1)
    alpha: float = key(low=0.0, above=True)
    dropout: float = key(low=0.0)
    target_modules: list[str] = key()
    exclude_modules: str | None = key()


@dataclass
class EarlyStopping:
    flip_rate_below: float | None = key(low=0.0, above=True, high=1.0)  # null: no early stopping
    window: int = key(low=1)


@dataclass
class FTSettings(Settings):
    """unsupervised_ft_llm.py; with VisionFTSettings's keys, unsupervised_ft_vlm.py."""

    batch_size: int = key(low=1)
    N: int = key(low=2)  # joint inference labels at least two examples together
    num_iterations: int = key(low=1)
    gamma: float = key(low=0.0)
    max_norm: float = key(low=0.0, above=True)
    eval_freq: int = key(low=1)
    ckpt_freq: int = key(low=1)
    optimization: Optimization = group(Optimization)
    task_encoder: str = key("lora", "linear")
    lora: LoRA = group(LoRA)
    calibrate: bool = key()
    calibrate_task_encoder: bool = key()
    early_stopping: EarlyStopping = group(EarlyStopping)
    forward_batch_size: int = key(low=1)
    wandb: bool = key()
    wandb_project: str = key()


@dataclass
class VisionFTSettings(FTSettings):
    """unsupervised_ft_vlm.py: an optimiser per task encoder, ``optimization`` the one in use."""

    optimizers: dict[str, Optimization] = key()


@dataclass
class EstimatorSettings:
    """configs/estimator/*.yaml: the gradient estimator of fine-tuning."""

    name: str = key(*ESTIMATORS)
    baseline: bool = key()  # subtract the reward of the argmax labels


# ------------------------------------------------------------------------------------ model configs
@dataclass
class CausalLMSettings:
    """configs/model/_causal_lm.yaml: a language model of the text scripts."""

    name: str = key()
    pretrained: str | None = key()
    embedded: str | None = key()
    gguf_file: str | None = key()
    tokenizer: str | None = key()
    dtype: str = key("auto", "float32", "bfloat16", "float16")
    attn_implementation: str = key("auto", "eager", "sdpa", "flash_attention_2")
    random_init: Any = key()
    load_in_4bit: bool = key()
    tensor_parallel_size: int | None = key(low=1)


@dataclass
class APIModelSettings(CausalLMSettings):
    """configs/model/openai_compatible.yaml: a model behind an OpenAI-compatible API (backend=openai)."""

    base_url: str = key()
    endpoint: str = key("completions", "chat")
    prompt_format: str = key("tokens", "text")
    max_top_logprobs: int = key(low=1)
    tokens_as_ids: bool = key()
    max_stop_strings: int = key(low=0)
    tokens_per_image: int = key(low=0)
    extra_body: Any = key()
    api_key_env: str = key()
    price_per_million_input_tokens: float | None = key(low=0.0)
    price_per_million_output_tokens: float | None = key(low=0.0)


@dataclass
class ImageFeatures:
    name: str = key()
    pretrained: str | None = key()
    random_init: Any = key()


@dataclass
class VisionLMSettings:
    """configs/model/_vision_lm.yaml: a vision-language model of the VLM scripts."""

    name: str = key()
    library: str = key("transformers", "openflamingo")
    pretrained: str | None = key()
    processor_kwargs: Any = key()
    dtype: str = key("auto", "float32", "bfloat16", "float16")
    random_init: Any = key()
    chunk_end: str = key()
    separator: str = key()
    lora_target_modules: list[str] = key()
    lora_exclude_modules: str | None = key()
    image_features: ImageFeatures = group(ImageFeatures)


@dataclass
class OpenFlamingoSettings(VisionLMSettings):
    """configs/model/openflamingo_4b.yaml: OpenFlamingo through the open_flamingo package."""

    checkpoint: str = key()
    clip_vision_encoder_path: str = key()
    clip_vision_encoder_pretrained: str = key()
    lang_encoder_path: str = key()
    tokenizer_path: str = key()
    cross_attn_every_n_layers: int = key(low=1)


def model_schema(model: DictConfig) -> type:
    """Which kind of model a model config describes: a vision-language model names its ``library``, a
    model behind an API its ``base_url``."""
    if "library" in model:
        return OpenFlamingoSettings if model.library == "openflamingo" else VisionLMSettings
    return APIModelSettings if "base_url" in model else CausalLMSettings


# ---------------------------------------------------------------------------------- dataset configs
@dataclass
class DatasetSettings:
    """configs/dataset/_dataset.yaml: what every data set has."""

    name: str = key()
    kind: str = key("classification", "generation", "mmmu")
    modality: str = key("text", "image")
    num_examples: int | None = key(low=1)
    sample_seed: int = key()
    data_root: str | None = key()


@dataclass
class HubDatasetSettings(DatasetSettings):
    hub_id: str | None = key()
    hub_config: str | None = key()
    source_splits: list[str] = key()


@dataclass
class TextClassificationSettings(HubDatasetSettings):
    """configs/dataset/_text_classification.yaml."""

    label_column: str = key()
    label_map: Any = key()
    num_classes: int = key(low=2)
    filter: dict[str, Any] | None = key()
    transductive: bool = key()
    sampler: str = key("stream", "original")
    on_bad_row: str = key("error", "skip")


@dataclass
class MMLUSettings(TextClassificationSettings):
    """configs/dataset/mmlu.yaml: subjects run one after the other."""

    subject: str = key()
    supervised_splits: list[str] = key()
    subjects: list[str] = key()


@dataclass
class ImageSplits:
    """Where the original release took an image task's pool and test set (the table3 presets apply it)."""

    source_splits: list[str] = key()
    test_split: str = key()


@dataclass
class ImageClassificationSettings(HubDatasetSettings):
    """configs/dataset/_image_classification.yaml."""

    test_split: str | None = key()
    original_splits: ImageSplits = group(ImageSplits)
    image_column: str = key()
    label_column: str = key()
    label_map: Any = key()
    labels_are_names: bool = key()
    num_classes: int = key(low=2)
    on_bad_image: str = key("stop", "skip")


@dataclass
class Exemplars:
    source: str = key("inline", "split")
    items: Any = key()
    split: str | None = key()
    response_field: str | None = key()
    remove: str | None = key()


@dataclass
class GenerationSettings(HubDatasetSettings):
    """configs/dataset/_generation.yaml: questions answered with chain of thought."""

    question_field: str = key()
    answer_field: str = key()
    answer_type: str = key("number", "choice")
    options_field: str | None = key()
    category_field: str | None = key()
    N: int = key(low=1)
    exemplars: Exemplars | None = key()


@dataclass
class MMMUSettings(DatasetSettings):
    """configs/dataset/mmmu.yaml: multi-image questions for a model behind an API."""

    hub_id: str = key()
    hub_config: str | None = key()
    subject_field: str | None = key()
    split: str = key()
    subject: str = key()
    N: int = key(low=1)
    subjects: list[str] = key()


@dataclass
class LocalDataSettings(DatasetSettings):
    """configs/dataset/local.yaml: the user's own file."""

    path: str | None = key()
    text_fields: list[str] | None = key()
    label_field: str | None = key()
    image_field: str | None = key()
    transductive: bool = key()
    on_bad_row: str = key("error", "skip")
    num_classes: int | None = key(low=2)


def dataset_schema(dataset: DictConfig) -> type:
    """Which kind of data set a dataset config describes (its ``kind`` and ``modality``; a file of the
    user's names its ``path``; MMLU lists its ``subjects``)."""
    if "path" in dataset:
        return LocalDataSettings
    if dataset.kind != "classification":
        return GenerationSettings if dataset.kind == "generation" else MMMUSettings
    if dataset.modality == "image":
        return ImageClassificationSettings
    return MMLUSettings if "subjects" in dataset else TextClassificationSettings


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


SCHEMAS = {"unsupervised_icl_llm": TextICLSettings, "unsupervised_icl_vlm": ICLSettings,
           "unsupervised_ft_llm": FTSettings, "unsupervised_ft_vlm": VisionFTSettings}


def check_settings(cfg: DictConfig, schema: type) -> None:
    """``cfg``'s own keys checked against the script's ``schema``, then that the model fits the backend
    (behind an API exactly when ``backend=openai``), then the model, the data set and the estimator
    against their schemas: unknown keys, types, choices, ranges and keys the config lacks."""
    check_node(cfg, schema, "", skip=GROUPS)
    behind_api = model_schema(cfg.model) is APIModelSettings
    if (cfg.backend == "openai") != behind_api:
        raise ConfigError(f"model={cfg.model.name} is behind an API: add backend=openai" if behind_api else
                          "backend=openai sends requests to a server: choose model=openai_compatible (with "
                          "model.name=... model.base_url=...) or model=gpt-4o-2024-08-06")
    groups = {"model": model_schema(cfg.model), "dataset": dataset_schema(cfg.dataset)}
    if "estimator" in cfg:  # fine-tuning alone has one
        groups["estimator"] = EstimatorSettings
    for group, group_schema in groups.items():
        check_node(cfg[group], group_schema, f"{group}.")


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
    names = {f.name for f in fields(schema)}
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
        raise ConfigError(f"{prefix}{key} cannot be read: {err.msg}")


def _expected(schema: type, key: str) -> str:
    """The type a dotted ``key`` of ``schema`` holds, in words."""
    for part in key.split("."):
        spec = {f.name: f for f in fields(schema)}.get(part)
        if spec is None:
            return "another type"
        schema = spec.type if isinstance(spec.type, type) else globals().get(str(spec.type), str)
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
