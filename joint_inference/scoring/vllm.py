"""Classification scoring on vLLM (``backend=vllm``, CUDA only): the :class:`~joint_inference.scoring.scorer.LabelScorer`
that zero-shot, ICL and UICL use, on a vLLM engine instead of a Hugging Face model.

Each prompt goes to vLLM as token ids that end right after the query's prefix, so the label is
the *next* token. One token is generated with ``allowed_token_ids`` set to the label tokens and
``logprobs`` to their number, on an engine built with ``logprobs_mode="processed_logprobs"``:
processed log-probs are taken after the allowed-token mask, so the returned top-k are exactly the
label tokens, as ``logit - logsumexp(label logits)``. That shift is shared by every token at the
position, so averaging over a label's tokens and renormalising over the K labels gives the
Hugging Face scorer's ``first``/``bot``/``bot_minimal`` scores (means of logits, log-softmaxed).
Prompt log-probs are never requested: vLLM skips its prefix cache for such requests, and the
prefix cache is what makes prompts that share demonstrations cheap.

Limits: ``exact`` mode with multi-token labels is refused (its later label tokens need one extra
branch per label and position); single-token ``exact`` equals ``first`` and works. ``read="all"``
(every example's label, used by fine-tuning) is refused: it needs prompt log-probs. Needs
vLLM >= 0.10.2 (``logprobs_mode="processed_logprobs"``; 0.10.0 had raw modes only).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.errors import ConfigError
from ..models.vllm_engine import build_vllm_engine
from ..prompts.templates import EncodedExample, PromptEncoder
from .scorer import assemble_prompts, label_weights, resolve_label_mode

MIN_VLLM = "0.10.2"  # the first with logprobs_mode="processed_logprobs"


def vllm_label_mode(label_mode: str, encoder: PromptEncoder) -> str:
    """``label_mode`` resolved as the HF scorer does, refusing what one next-token read cannot give."""
    mode = resolve_label_mode(label_mode, encoder.label_ids, encoder.label_names)
    multi = [name for name, ids in zip(encoder.label_names, encoder.label_ids) if len(ids) > 1]
    if mode == "exact" and multi:
        raise ConfigError(
            f"backend=vllm cannot score label_mode=exact with multi-token labels {multi}: it reads only the "
            "next token after the prompt. Use label_mode=first (needs distinct first tokens), bot or bot_minimal, "
            "or backend=hf.")
    return mode


class VLLMScorer:
    """Label log-probabilities of a ``vllm.LLM`` built with ``logprobs_mode="processed_logprobs"``
    (see :func:`make_vllm_scorer`): the :class:`~joint_inference.scoring.scorer.LabelScorer` of ``backend=vllm``.
    Returns CPU tensors."""

    device = torch.device("cpu")

    def __init__(self, llm, encoder: PromptEncoder, label_mode: str = "auto", show_progress: bool = True):
        self.llm = llm
        self.encoder = encoder
        self.mode = vllm_label_mode(label_mode, encoder)
        self.columns, self.weights = label_weights(self.mode, encoder.label_ids)
        self.show_progress = show_progress
        self.batch_size = None  # vLLM schedules its own batches

    def label_logprobs(
        self,
        prompts: Sequence[Sequence[EncodedExample]],
        labels: Sequence[Sequence[int]],
        read: str = "query",
        desc: str | None = None,
    ) -> torch.Tensor:
        """(P, K) log-softmax over the K labels at each prompt's query, as ``Scorer.label_logprobs``."""
        if read == "all":
            raise ConfigError("backend=vllm scores only the query's label (read='query'); reading every "
                              "example's label (fine-tuning) needs backend=hf")
        seqs, _ = assemble_prompts(self.encoder, prompts, labels, read)
        return self._score(seqs, progress=self.show_progress and desc is not None)

    def shared_label_logprobs(
        self,
        demonstrations: Sequence[EncodedExample],
        demo_labels: Sequence[int],
        queries: Sequence[EncodedExample],
    ) -> torch.Tensor:
        """(Q, K) label log-probs of each query after the same demonstrations: whole prompts,
        whose shared demonstrations vLLM's prefix cache computes once."""
        return self.label_logprobs([[*demonstrations, q] for q in queries], [list(demo_labels)] * len(queries))

    def _score(self, seqs: list[list[int]], progress: bool) -> torch.Tensor:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not seqs:
            return torch.empty(0, self.encoder.num_labels)
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=len(self.columns),
                                allowed_token_ids=self.columns)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=progress)
        rows = []
        for out in outputs:
            step = out.outputs[0].logprobs[0]  # {token id: Logprob} of the one generated position
            missing = [t for t in self.columns if t not in step]
            if missing:
                raise RuntimeError(f"vLLM returned no log-probs for label tokens {missing}; the engine must be "
                                   "built with logprobs_mode='processed_logprobs' (see make_vllm_scorer)")
            rows.append([step[t].logprob for t in self.columns])
        return torch.log_softmax(torch.tensor(rows, dtype=torch.float32) @ self.weights.T, dim=-1)


def make_vllm_scorer(model, encoder: PromptEncoder, label_mode: str = "auto", *, seed: int = 0,
                     show_progress: bool = True, **engine_args) -> VLLMScorer:
    """A :class:`VLLMScorer` on a new vLLM engine for a ``model/`` config (see
    :func:`~joint_inference.models.vllm_engine.build_vllm_engine`). ``engine_args`` go to ``vllm.LLM``.

    Label-mode errors come before vLLM is imported, so a bad configuration fails without a GPU.
    """
    mode = vllm_label_mode(label_mode, encoder)
    columns, _ = label_weights(mode, encoder.label_ids)
    llm = build_vllm_engine(model, seed=seed, min_version=MIN_VLLM, enable_prefix_caching=True,
                            logprobs_mode="processed_logprobs", max_logprobs=max(20, len(columns)), **engine_args)
    return VLLMScorer(llm, encoder, mode, show_progress)
