"""Typed settings: what each entry script, model, data set, template, label set and prompt style holds.

These dataclasses are the objects the layers receive. The composition root (``joint_inference.runs``)
reads Hydra's composed configuration into them once, checking every key against them first (types,
choices, ranges, keys a config lacks), and below it no code sees the configuration: a model loader gets
the model's settings, a data loader the data set's, a method the run's.

A field's metadata says what it may hold (:func:`key`); the YAML files under ``configs/`` hold the values
with a comment per key (``--help`` prints them), so the dataclasses hold no values of their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MISSING = "???"  # a key whose value the YAML gives (omegaconf's mark for it)
LABEL_MODES = ("auto", "first", "bot", "bot_minimal", "exact")
FOLDING_MODES = ("auto", "first", "exact")  # modes whose scores do not change when shared label tokens fold
ESTIMATORS = ("rao_marginalized", "rao", "naive")


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


def chosen():
    """A config group's option (``model``, ``dataset``, ...), read by the schema of the option chosen
    (``joint_inference.runs.config``)."""
    return field(default=None)


@dataclass
class Settings:
    """What every entry script has: its config groups' options, read by their own schemas, and its keys."""

    model: Any = chosen()  # CausalLMSettings, APIModelSettings, VisionLMSettings or OpenFlamingoSettings
    dataset: Any = chosen()  # a DatasetSettings of the data set's kind
    template: Any = chosen()  # a TemplateSettings of the data set's kind
    labelset: LabelSetSettings | None = chosen()
    prompt_style: PromptStyleSettings | None = chosen()  # the text scripts' GSM8K prompts; None elsewhere

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
    controls: list[str] = key()
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
    num_iterations: int = key(low=0)  # 0: the zero-shot evaluation alone
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
    controls: list[str] = key()
    forward_batch_size: int = key(low=1)
    wandb: bool = key()
    wandb_project: str = key()
    estimator: EstimatorSettings | None = chosen()  # fine-tuning's gradient estimator


@dataclass
class VisionFTSettings(FTSettings):
    """unsupervised_ft_vlm.py: an optimiser per task encoder, ``optimization`` the one in use."""

    optimizers: dict[str, Optimization] = key()


@dataclass
class ClassificationTemplate:
    """configs/template/<classification task>.yaml: one text with the input fields and ``{y}``."""

    text: str | None = key()  # null: the user's own data, which names it on the command line


@dataclass
class GenerationTemplate:
    """configs/template/{gsm8k,mmlu_pro}.yaml: chain-of-thought prompts (methods/generation.py, CotFormat)."""

    instruction: str = key()
    supervised_instruction: str = key()
    query: str = key()
    separator: str = key()
    zero_shot: str = key()
    stop: list[str] | None = key()
    stop_clean: list[str] | None = key()
    stop_after: list[str] | None = key()


@dataclass
class MMMUTemplate:
    """configs/template/mmmu*.yaml: a system message and an instruction per question type."""

    system: dict[str, str] = key()
    suffix: dict[str, str] = key()
    image_detail: str | None = key()


@dataclass
class LabelSetSettings:
    """configs/labelset/*.yaml: the class names, in class-id order (null: a generation task's open answers)."""

    names: list[str] | None = key()


@dataclass
class PromptStyleSettings:
    """configs/prompt_style/*.yaml: a model family's published GSM8K prompt and exemplars."""

    name: str = key()
    source: str = key()
    zero_shot: str = key()
    exemplars: Any = key()


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

    base_url: str | None = key()  # null: $OPENAI_BASE_URL
    endpoint: str = key("completions", "chat")
    prompt_format: str = key("auto", "tokens", "text")
    score_with: str = key("auto", "echo", "top_logprobs")
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
class LMEvalSettings(DatasetSettings):
    """configs/dataset/lm_eval.yaml: a multiple-choice task of lm-evaluation-harness (data/lm_eval.py)."""

    task: str | None = key()
    include_path: str | None = key()
    metric: str = key("acc", "acc_norm")


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
