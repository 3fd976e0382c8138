"""The settings of each entry script, typed, and checked once before any model loads.

Hydra composes the YAML files; :func:`check_settings` then reads the composed configuration's own
keys (not the config groups: model, dataset, template, ...) into the script's dataclass, so that a key
the script does not have, a value of the wrong type, a choice outside the listed ones and a number out
of range each stop the run with ``error:`` naming the key, before anything is loaded or written.
The YAML files keep the defaults and a comment per key (``--help`` prints them); the dataclasses
say what each key may hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import Container, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from .errors import ConfigError

GROUPS = ("model", "dataset", "template", "labelset", "estimator", "prompt_style", "hydra")  # checked by their owners
LABEL_MODES = ("auto", "first", "bot", "bot_minimal", "exact")


def choice(*options):
    """A field whose value must be one of ``options``."""
    return {"choices": options}


def at_least(low, *, above: bool = False):
    """A number field bounded below (strictly with ``above``)."""
    return {"low": low, "above": above}


@dataclass
class Settings:
    """What every entry script has."""

    seed: int = 0
    device: str = "auto"
    label_mode: str = field(default="auto", metadata=choice(*LABEL_MODES))
    progress: bool = True
    output_dir: str = "."
    dry_run: bool = False
    allow_long_cpu_run: bool = False


@dataclass
class ICLSettings(Settings):
    """unsupervised_icl_{llm,vlm}.py."""

    N: int = field(default=16, metadata=at_least(1))
    T: int = field(default=8, metadata=at_least(0))
    stop_when_flips_below: float | None = field(default=None, metadata=at_least(0.0))
    num_repeats: int = field(default=5, metadata=at_least(1))
    batch_size: int | str = field(default="auto", metadata={**at_least(1), "words": ("auto",)})
    support_sampling: str = field(default="per_query", metadata=choice("per_query", "shared"))
    protocol: str = field(default="clean", metadata=choice("clean", "original"))
    block_size: int = field(default=32, metadata=at_least(1))
    supervised_icl: bool = True
    save_predictions: bool = False
    backend: str = field(default="hf", metadata=choice("hf", "vllm", "openai"))
    temperature: float = field(default=0.0, metadata=at_least(0.0))
    top_p: float = field(default=1.0, metadata=at_least(0.0, above=True))
    max_new_tokens: int = field(default=1024, metadata=at_least(1))
    n_shots: int | None = field(default=None, metadata=at_least(0))
    api: Any = None  # backend=openai: checked by joint_inference/api


@dataclass
class Optimization:
    lr: float = field(default=1e-5, metadata=at_least(0.0, above=True))
    schedule: str = field(default="constant", metadata=choice("constant", "cosine"))
    warmup_steps: int = field(default=0, metadata=at_least(0))
    min_lr: float = field(default=0.0, metadata=at_least(0.0))


@dataclass
class LoRA:
    r: int = field(default=16, metadata=at_least(1))
    alpha: float = field(default=16.0, metadata=at_least(0.0, above=True))
    dropout: float = field(default=0.0, metadata=at_least(0.0))
    target_modules: Any = None
    exclude_modules: Any = None


@dataclass
class EarlyStopping:
    flip_rate_below: float | None = field(default=None, metadata=at_least(0.0))
    window: int = field(default=10, metadata=at_least(1))


@dataclass
class FTSettings(Settings):
    """unsupervised_ft_{llm,vlm}.py."""

    batch_size: int = field(default=8, metadata=at_least(1))
    N: int = field(default=16, metadata=at_least(1))
    num_iterations: int = field(default=3000, metadata=at_least(1))
    gamma: float = field(default=10.0, metadata=at_least(0.0))
    max_norm: float = field(default=10.0, metadata=at_least(0.0, above=True))
    eval_freq: int = field(default=50, metadata=at_least(1))
    ckpt_freq: int = field(default=100, metadata=at_least(1))
    optimization: Optimization = field(default_factory=Optimization)
    optimizers: Any = None  # the VLM script's optimiser per task encoder; ``optimization`` is the one in use
    task_encoder: str = field(default="lora", metadata=choice("lora", "linear"))
    lora: LoRA = field(default_factory=LoRA)
    calibrate: bool = False
    calibrate_task_encoder: bool = False
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    forward_batch_size: int = field(default=32, metadata=at_least(1))
    wandb: bool = False
    wandb_project: str = "joint-inference"


SCHEMAS = {"unsupervised_icl_llm": ICLSettings, "unsupervised_icl_vlm": ICLSettings,
           "unsupervised_ft_llm": FTSettings, "unsupervised_ft_vlm": FTSettings}


def check_settings(cfg: DictConfig, schema: type) -> None:
    """``cfg``'s own keys checked against ``schema``: unknown keys, types, choices and ranges; then the
    keys whose interpolation fails (``optimization: ${optimizers.${task_encoder}}`` of an unknown
    encoder), so that the key the user set is the one named."""
    own, unresolved = {}, {}
    for key in cfg:
        if key in GROUPS:
            continue
        try:
            value = cfg[key]
            own[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
        except OmegaConfBaseException as err:
            unresolved[key] = err
    names = {f.name for f in fields(schema)}
    unknown = sorted(set(own) - names)
    if unknown:
        raise ConfigError(f"unknown setting {', '.join(unknown)}; the settings of this script: "
                          f"{', '.join(sorted(names))} (and the groups {', '.join(GROUPS[:-1])})")
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), own)
    except ValidationError as err:
        key = err.full_key or "?"
        raise ConfigError(f"{key}={err.value!r}: expected {_expected(schema, key)}") from None
    check_values(OmegaConf.to_object(typed), "")
    for key, err in unresolved.items():
        raise ConfigError(f"{key} cannot be read: {err.msg}")


def _expected(schema: type, key: str) -> str:
    """The type a dotted ``key`` of ``schema`` holds, in words."""
    for part in key.split("."):
        spec = {f.name: f for f in fields(schema)}.get(part)
        if spec is None:
            return "another type"
        schema = spec.type if isinstance(spec.type, type) else globals().get(str(spec.type), str)
    words = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text", "None": "null"}
    return " or ".join(words.get(t.strip(), t.strip()) for t in str(spec.type).split("|"))


def check_values(settings, prefix: str) -> None:
    """Choices and ranges of ``settings`` and of the dataclasses inside it."""
    for spec in fields(settings):
        value, key = getattr(settings, spec.name), f"{prefix}{spec.name}"
        if hasattr(value, "__dataclass_fields__"):
            check_values(value, f"{key}.")
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
            if value < meta["low"] or (meta["above"] and value == meta["low"]):
                bound = f"above {meta['low']}" if meta["above"] else f"at least {meta['low']}"
                raise ConfigError(f"{key}={value!r} is out of range: it must be {bound}")
