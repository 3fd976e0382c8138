"""The composition root of the four entry scripts, and the only code that reads their configuration.

    entry script -> run_icl(cfg) / run_finetuning(cfg)    Hydra's composed configuration
      -> read_settings(cfg)                               typed settings, every key checked (runs/config.py)
      -> the task's data, the tokenizer (loaded once), the prompt encoder
      -> check_size: dry_run=true stops here; a CPU run estimated over an hour too (runs/planning.py)
      -> the scorer or generator of the backend (hf, vllm, openai)
      -> the method (methods/), which writes the results into the run directory

Below this module no function sees the configuration: a method receives its settings, the task and the
built scorer or generator; a loader receives the settings of its model or data set.
"""
from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..api.client import APIClient, DryRunClient, DryRunTally, client_settings
from ..core.distributed import process_state
from ..core.errors import ConfigError
from ..core.settings import (
    FTSettings,
    ICLSettings,
    LMEvalSettings,
    LocalDataSettings,
    MMLUSettings,
    TextICLSettings,
)
from ..core.utils import resolve_batch_size, resolve_device, scoring_batch, seed_everything
from ..data.hub import ALL_SUBJECTS, TaskData
from ..data.lm_eval import CHOICES_FIELD, load_lm_eval_task
from ..data.tasks import load_data, modality, row_check
from ..methods import uft
from ..methods.controls import check_controls
from ..methods.finetune import add_lora
from ..methods.generation import CotFormat, load_generative_task, run_generation, sampling_settings
from ..methods.mmmu import run_mmmu
from ..methods.subjects import run_all_subjects
from ..methods.uicl import check_pool, run_classification
from ..models.language import context_length, load_model, load_tokenizer
from ..prompts.encoders import build_prompt_encoder
from ..prompts.templates import ChoiceEncoder, Template
from ..scoring.generators import HFGenerator, SamplingSettings, VLLMGenerator
from ..scoring.scorer import LabelScorer, Scorer
from .config import plain, read_dataset, read_settings
from .planning import api_dry_run, check_size, subjects_plan


# ---------------------------------------------------------------------------------- the scripts
def run_icl(cfg: DictConfig) -> dict:
    """unsupervised_icl_llm.py and unsupervised_icl_vlm.py: by the task's kind, classification (text or images;
    MMLU's all-subjects runs), generation (GSM8K, MMLU-Pro) or MMMU through an API."""
    settings = with_lm_eval_task(read_settings(cfg))
    check_input_is_not_written(settings)
    subjects = subject_datasets(cfg, settings)
    if settings.dry_run and settings.backend == "openai":  # requests, tokens and cost of a model behind an API
        return api_dry_run(settings, lambda counted, tally: in_context(counted, subjects, tally))
    return in_context(settings, subjects)


def run_finetuning(cfg: DictConfig) -> dict:
    """unsupervised_ft_llm.py and unsupervised_ft_vlm.py."""
    settings: FTSettings = with_lm_eval_task(read_settings(cfg))
    check_input_is_not_written(settings)
    check_controls(settings.controls, "fine-tuning", "clean")
    seed_everything(settings.seed)  # before the LoRA adapters are drawn
    parts = Parts(settings)
    uft.check_rules(settings)
    data = parts.data()
    uft.check_pool(settings, data)
    if (dry_run := check_size(settings, data, parts.text_encoder, parts.device)) is not None:
        return dry_run
    model, encoder = parts.model_and_encoder(data)
    if settings.task_encoder == "lora":  # one copy of the model: adapters on for q, off for the reward
        lora = settings.lora
        model = add_lora(model, lora.r, lora.alpha, lora.dropout, list(lora.target_modules), lora.exclude_modules)
    scorer = Scorer(model, encoder, settings.label_mode, settings.forward_batch_size, show_progress=settings.progress)
    image_features = None
    if settings.task_encoder == "linear" and parts.image:  # a linear head on CLIP image embeddings
        from ..models.vision import clip_features

        image_features = clip_features(settings.model, settings.dataset, data, parts.device, settings.progress)
    return uft.run_finetuning(settings, data, scorer, plain(cfg), image_features)


def in_context(settings: ICLSettings, subjects: list | None, tally: DryRunTally | None = None) -> dict:
    """The in-context run of ``settings``; ``tally``: the API clients count requests into it (a dry run)."""
    kind = settings.dataset.kind
    check_controls(settings.controls, kind, settings.protocol)
    if settings.dry_run and kind != "classification":
        raise ConfigError("dry_run=true counts the prompts of classification tasks; generation tasks (responses of "
                          "unknown length) have no dry run yet")
    if kind == "mmmu":  # run_mmmu refuses another backend before it asks for the generator
        return run_mmmu(settings, lambda: api_generator(settings, sampling_settings(settings), tally, settings.seed))
    if kind == "generation":
        task = load_generative_task(settings.dataset, settings.protocol)
        fmt = CotFormat.from_template(settings.template, settings.protocol)
        return run_generation(settings, task, fmt, lambda: make_generator(settings, sampling_settings(settings, fmt),
                                                                         tally))
    if subjects is not None:
        return all_subjects(settings, subjects, tally)
    parts = Parts(settings, tally)
    data = parts.data()
    check_pool(settings, data)
    if (dry_run := check_size(settings, data, parts.text_encoder, parts.device)) is not None:
        return dry_run
    return run_classification(settings, data, parts.scorer(data))


def all_subjects(settings: ICLSettings, subjects: list, tally: DryRunTally | None) -> dict:
    """MMLU's ``subject=all``: every subject's run with the scorer built once."""
    runs = [(name, replace(settings, dataset=dataset, output_dir=str(Path(settings.output_dir) / "subjects" / name)))
            for name, dataset in subjects]
    parts = Parts(settings, tally)
    if settings.dry_run:
        return subjects_plan(settings, [parts.data(run) for _, run in runs], parts.text_encoder(), parts.device)
    first = parts.data(runs[0][1])  # read before the model loads: a file that cannot be read stops the run first
    return run_all_subjects(settings, runs, lambda run: first if run is runs[0][1] else parts.data(run),
                            parts.scorer(first))


def check_input_is_not_written(settings: ICLSettings | FTSettings) -> None:
    """The user's own file is read, never written: it may not lie in the run directory, where the run writes."""
    dataset = settings.dataset
    if not isinstance(dataset, LocalDataSettings) or not dataset.path:
        return
    path, out = Path(dataset.path).expanduser().resolve(), Path(settings.output_dir).expanduser().resolve()
    if out in path.parents:
        raise ConfigError(f"dataset.path={dataset.path} lies in the run directory {out}, where the run writes its "
                          "results and predictions (it could overwrite its own input); copy the file elsewhere and "
                          "point dataset.path at the copy")


def subject_datasets(cfg: DictConfig, settings) -> list | None:
    """[(subject, its dataset settings)] of a run over every subject (``dataset.subject=all``), else None."""
    dataset = settings.dataset
    if not isinstance(dataset, MMLUSettings) or dataset.subject != ALL_SUBJECTS:
        return None
    if not dataset.subjects:
        raise ConfigError(f"dataset.subjects of {dataset.name!r} is empty; name the subjects to run")
    return [(subject, read_dataset(OmegaConf.merge(cfg, {"dataset": {"subject": subject}}).dataset))
            for subject in dataset.subjects]


# ---------------------------------------------------------------------------------- the parts
class Parts:
    """What a classification or fine-tuning run is built from, each made when first asked for: its device,
    tokenizer (loaded once), prompt encoder, data and scorer."""

    def __init__(self, settings: ICLSettings | FTSettings, tally: DryRunTally | None = None):
        self.settings, self.tally = settings, tally
        self.device = resolve_device(settings.device)
        self.image = modality(settings.dataset) == "image"
        self.tokenizer = cache(lambda: load_tokenizer(settings.model))
        self.encoder = cache(lambda: prompt_encoder(settings, self.tokenizer()))
        # the longest example the model takes (read from its config; a random model's or an API's: unchecked)
        local = settings.backend in ("hf", "vllm") and not settings.model.random_init
        self.context = cache(lambda: context_length(settings.model) if local else None)

    def text_encoder(self):
        """The prompt encoder of a text task (an image task's needs its model's image features: None)."""
        return None if self.image else self.encoder()

    def data(self, settings: ICLSettings | FTSettings | None = None) -> TaskData:
        """The task's sample; a text row that the model cannot score is refused (or skipped) as it is read."""
        s = settings or self.settings  # a subject's settings differ in their data set alone

        def check():
            context = self.context()
            return row_check(s.template.text, self.encoder() if context else None, context)

        return load_data(s.dataset, s.labelset.names, s.template.text, check)

    def model_and_encoder(self, data: TaskData):
        """(the model on the run's device, the prompt encoder of its prompts)."""
        s = self.settings
        if self.image:
            from ..models.vision import load_image_model

            model, tokenizer, images = load_image_model(s.model, s.dataset, self.device, data, s.progress)
            return model, build_prompt_encoder(tokenizer, s.template.text, s.labelset.names, s.label_mode, images,
                                               s.model)
        model, _ = load_model(s.model, self.device, self.tokenizer())
        return model, self.encoder()

    def scorer(self, data: TaskData) -> LabelScorer:
        """The label scorer of ``settings.backend``: transformers in this process, vLLM, or a server's API."""
        s = self.settings
        if s.backend == "hf":
            model, encoder = self.model_and_encoder(data)
            batch_size, batch_tokens = scoring_batch(s.forward_batch_size, self.device)
            return Scorer(model, encoder, s.label_mode, batch_size, show_progress=s.progress, batch_tokens=batch_tokens,
                          length_normalised=isinstance(s.dataset, LMEvalSettings) and s.dataset.metric == "acc_norm")
        if self.image:
            raise ConfigError(f"backend={s.backend} " + (
                "scores text tasks; image tasks run with backend=hf" if s.backend == "vllm" else
                "classifies text tasks; image classification runs with backend=hf (MMMU runs through the API: "
                "dataset=mmmu)"))
        if s.backend == "vllm":
            from ..scoring.vllm import make_vllm_scorer

            if process_state().num_processes > 1:
                raise ConfigError("backend=vllm runs in one process (it spreads the model over the visible GPUs with "
                                  "tensor parallelism); start it with python, not accelerate launch")
            return make_vllm_scorer(s.model, self.encoder(), s.label_mode, seed=s.seed, show_progress=s.progress)
        from ..scoring.api import APIScorer

        encoder, m = self.encoder(), s.model
        client = api_client(s, self.tally, lambda text: len(encoder.tokenizer(text)["input_ids"]))
        return APIScorer(client, encoder, s.label_mode, endpoint=m.endpoint, prompt_format=m.prompt_format,
                         max_top_logprobs=m.max_top_logprobs, tokens_as_ids=m.tokens_as_ids, score_with=m.score_with)


def prompt_encoder(settings: ICLSettings | FTSettings, tokenizer):
    """The prompt encoder of a text task's template and label set (an lm-eval task's examples are joined by
    its ``fewshot_delimiter``)."""
    dataset = settings.dataset
    if isinstance(dataset, LMEvalSettings):
        task = load_lm_eval_task(dataset.task, dataset.include_path)
        return ChoiceEncoder(tokenizer, Template(settings.template.text), settings.labelset.names, CHOICES_FIELD,
                             separator=task.fewshot_delimiter)
    return build_prompt_encoder(tokenizer, settings.template.text, settings.labelset.names, settings.label_mode)


def with_lm_eval_task(settings):
    """``dataset=lm_eval``: the template and label set are the task's (its prompt and choices), and labels are
    scored as lm-eval scores choices, the continuation's whole log-likelihood (``label_mode=auto`` -> ``exact``)."""
    dataset = settings.dataset
    if not isinstance(dataset, LMEvalSettings):
        return settings
    if settings.label_mode not in ("auto", "exact"):
        raise ConfigError(f"dataset=lm_eval scores each choice as lm-eval does, by the log-likelihood of all its "
                          f"tokens: label_mode=exact (or auto), not {settings.label_mode}")
    if isinstance(settings, FTSettings) or getattr(settings, "backend", "hf") != "hf":
        raise ConfigError("dataset=lm_eval runs unsupervised ICL with backend=hf (unsupervised_icl_llm.py); "
                          "fine-tuning and the vllm/openai backends do not score per-document choices yet")
    task = load_lm_eval_task(dataset.task, dataset.include_path)
    return replace(settings, template=replace(settings.template, text=task.template),
                   labelset=replace(settings.labelset, names=list(task.choices)),
                   label_mode="exact" if settings.label_mode == "auto" else settings.label_mode)


# ------------------------------------------------------------------------------ generators
def make_generator(settings: TextICLSettings, sampling: SamplingSettings, tally: DryRunTally | None = None):
    """The generator of ``settings.backend`` for ``settings.model``."""
    if settings.backend == "openai":  # behind an API
        return api_generator(settings, sampling, tally)
    if settings.backend == "hf":
        device = resolve_device(settings.device)
        model, tokenizer = load_model(settings.model, device)
        # decoding gains from bigger batches
        batch_size = resolve_batch_size(settings.forward_batch_size, device, cpu_default=16)
        return HFGenerator(model, tokenizer, sampling, batch_size, settings.progress)
    from ..models.vllm_engine import build_vllm_engine

    return VLLMGenerator(build_vllm_engine(settings.model, seed=settings.seed), sampling, settings.progress)


def api_generator(settings: TextICLSettings, sampling: SamplingSettings, tally: DryRunTally | None,
                  seed: int | None = None):
    """The generator of ``backend=openai`` (``model.endpoint``, ``model.max_stop_strings``)."""
    from ..scoring.api_generators import APIGenerator

    client = api_client(settings, tally, count_text(settings.model) if tally else None)
    return APIGenerator(client, sampling, settings.model.endpoint, settings.model.max_stop_strings, seed)


def api_client(settings: TextICLSettings, tally: DryRunTally | None, count_text=None) -> APIClient:
    """The run's client of the server; in a dry run, one that counts into ``tally`` and sends nothing."""
    transport = client_settings(settings.model, settings.api, settings.output_dir, settings.progress)
    if tally is None:
        return APIClient(transport)
    return DryRunClient(transport, tally, settings.api.dry_run_output_tokens, count_text,
                        settings.model.tokens_per_image)


def count_text(model):
    """A token counter for dry runs: the model's tokenizer where it loads, else None (about 4 characters a token)."""
    try:
        tokenizer = load_tokenizer(model)
    except Exception:  # no local tokenizer for a hosted model: estimate
        return None
    return lambda text: len(tokenizer(text)["input_ids"])
