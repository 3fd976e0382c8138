"""Text generation behind one small interface, with two backends.

    generator.generate(prompts, num_samples, seed=0) -> list[list[str]]   # num_samples texts per prompt

``hf`` (default) runs Hugging Face ``generate`` on CPU or GPU: prompts sorted by length, batched,
left-padded, restored to their order; the batch halves on out-of-memory. ``vllm`` runs vLLM with
tensor parallelism over ``model.tensor_parallel_size`` GPUs (default: all visible) and is imported only when chosen. Both end each response
at the first stop string: before a ``stop`` string (where a next question starts), after a
``stop_after`` one (a final-answer statement, kept). Both treat temperature 0 as greedy decoding,
where all samples of a prompt are the same text (generated once). Nothing else changes with the backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import ConfigError
from ..core.utils import in_batches_longest_first


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # a response ends before the first of these
    stop_after: tuple[str, ...] = ()  # ... or right after the first of these, which it keeps

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def stop_strings(self) -> list[str]:
        """Every string that ends generation."""
        return [*self.stop, *self.stop_after]


def cut_at_stop(text: str, stop: tuple[str, ...], stop_after: tuple[str, ...] = ()) -> str:
    """``text`` up to the earliest stop string: without it for ``stop``, with it for ``stop_after``."""
    found = [(i, 0) for i in (text.find(s) for s in stop if s) if i >= 0]
    found += [(i, len(s)) for i, s in ((text.find(s), s) for s in stop_after if s) if i >= 0]
    start, kept = min(found, default=(len(text), 0))
    return text[:start + kept]


class HFGenerator:
    """Hugging Face ``generate``: batched, longest prompts first, left-padded."""

    def __init__(self, model, tokenizer, settings: SamplingSettings, batch_size: int = 16, show_progress: bool = True):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.batch_size, self.show_progress = batch_size, show_progress
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def generate(self, prompts: list[str], num_samples: int = 1, seed: int = 0) -> list[list[str]]:
        s = self.settings
        per_prompt = 1 if s.greedy else num_samples
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        texts: list[list[str]] = [[] for _ in prompts]
        sampling = {} if s.greedy else {"temperature": s.temperature, "top_p": s.top_p, "top_k": 0}

        def process(idx):
            enc = self.tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                 padding_side="left").to(self.model.device)
            torch.manual_seed(seed * 1_000_003 + idx[0])  # sampled outputs depend on the seed and the batch only
            with torch.no_grad():
                out = self.model.generate(
                    **enc, do_sample=not s.greedy, **sampling, max_new_tokens=s.max_new_tokens,
                    num_return_sequences=per_prompt, stop_strings=s.stop_strings or None,
                    tokenizer=self.tokenizer, pad_token_id=self.tokenizer.pad_token_id)
            decoded = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for j, i in enumerate(idx):
                texts[i] = [cut_at_stop(t, s.stop, s.stop_after) for t in decoded[j * per_prompt:(j + 1) * per_prompt]]

        self.batch_size = in_batches_longest_first(lengths, self.batch_size, process, "generating", self.show_progress)
        return [t * num_samples if s.greedy else t for t in texts]


class VLLMGenerator:
    """A vLLM engine (:func:`~joint_inference.models.vllm_engine.build_vllm_engine`: tensor parallel over the GPUs)."""

    def __init__(self, llm, settings: SamplingSettings, show_progress: bool = True):
        self.llm, self.settings, self.show_progress = llm, settings, show_progress

    def generate(self, prompts: list[str], num_samples: int = 1, seed: int = 0) -> list[list[str]]:
        from vllm import SamplingParams

        s = self.settings
        n = 1 if s.greedy else num_samples
        params = [SamplingParams(n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                 stop=s.stop_strings, include_stop_str_in_output=True,  # cut_at_stop decides
                                 seed=seed * 1_000_003 + i) for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=self.show_progress)
        texts = [[cut_at_stop(o.text, s.stop, s.stop_after) for o in out.outputs] for out in outputs]
        return [t * num_samples if s.greedy else t for t in texts]
