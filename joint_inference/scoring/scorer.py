"""The scorer: prompts of (example, label) pairs -> K-way label log-probabilities.

This one component serves zero-shot, supervised ICL, unsupervised ICL and the reward of
unsupervised fine-tuning. It runs the model body once per prompt (batched, longest first),
gathers the hidden states at the label-read positions only, and applies the output
projection there -- to the label tokens' columns alone unless ``exact`` mode needs the
full vocabulary.

Label modes (docs/protocol.md §2): ``first`` (first label token), ``bot`` (mean logit over the
label's tokens), ``bot_minimal`` (bag of the shortest distinguishing token prefix),
``exact`` (sum of the label tokens' log-probs) and ``auto`` (``first`` when the first tokens
are distinct, else ``exact``). The K scores are renormalised with a log-softmax.
"""
from __future__ import annotations

import copy
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from ..core.errors import ConfigError
from ..core.settings import LABEL_MODES
from ..core.utils import in_batches_longest_first
from ..prompts.templates import EncodedExample, PromptEncoder


def minimal_prefix_lengths(label_ids: Sequence[Sequence[int]]) -> list[int]:
    """For each label, the fewest leading tokens that no other label starts with."""
    lengths = []
    for k, ids in enumerate(label_ids):
        others = [o for j, o in enumerate(label_ids) if j != k]
        m = 1
        while m < len(ids) and any(tuple(o[:m]) == tuple(ids[:m]) for o in others):
            m += 1
        lengths.append(m)
    return lengths


def resolve_label_mode(mode: str, label_ids: Sequence[Sequence[int]], label_names: Sequence[str]) -> str:
    """Check ``mode`` against the label tokens; turn ``auto`` into ``first`` or ``exact``."""
    if mode not in LABEL_MODES:
        raise ConfigError(f"unknown label_mode {mode!r}; valid modes: {', '.join(LABEL_MODES)}")
    same = {}
    for name, ids in zip(label_names, label_ids):
        same.setdefault(tuple(ids), []).append(name)
    clashes = [names for names in same.values() if len(names) > 1]
    if clashes:  # every mode would give them the same score
        raise ConfigError(f"labels {clashes} tokenize identically, so the model cannot tell them apart in any "
                          "label_mode; rename them in labelset.names so that their text differs in more than "
                          "what the tokenizer drops (case, accents, spacing)")
    firsts = [ids[0] for ids in label_ids]
    distinct = len(set(firsts)) == len(firsts)
    if mode == "auto":
        return "first" if distinct else "exact"
    if mode == "first" and not distinct:
        clashes = {}
        for name, tok in zip(label_names, firsts):
            clashes.setdefault(tok, []).append(name)
        shared = [names for names in clashes.values() if len(names) > 1]
        raise ConfigError(
            f"label_mode=first needs distinct first tokens, but these labels share one: {shared}. "
            "Use label_mode=exact (or auto, bot, bot_minimal), or rename the labels."
        )
    return mode


def label_weights(mode: str, label_ids: Sequence[Sequence[int]]) -> tuple[list[int], torch.Tensor]:
    """Output columns the labels read, and a (K, columns) matrix averaging each label's tokens: its
    first token (``first``, and single-token ``exact``), all of them (``bot``) or its shortest
    distinguishing prefix (``bot_minimal``)."""
    if mode in ("first", "exact"):
        used = [ids[:1] for ids in label_ids]
    elif mode == "bot":
        used = [tuple(ids) for ids in label_ids]
    else:
        used = [ids[:m] for ids, m in zip(label_ids, minimal_prefix_lengths(label_ids))]
    columns = sorted({t for ids in used for t in ids})
    index = {t: i for i, t in enumerate(columns)}
    weights = torch.zeros(len(used), len(columns))
    for k, ids in enumerate(used):
        for t in ids:
            weights[k, index[t]] += 1.0 / len(ids)
    return columns, weights


def assemble_prompts(encoder: PromptEncoder, prompts: Sequence[Sequence[EncodedExample]],
                     labels: Sequence[Sequence[int]], read: str) -> tuple[list[list[int]], list[list[int]]]:
    """(token ids, label-read positions) of each prompt: the query's position (``read="query"``,
    one label per demonstration) or every example's (``read="all"``, one label per example)."""
    if read not in ("query", "all"):
        raise ValueError(f"read must be 'query' or 'all', got {read!r}")
    seqs, positions = [], []
    for examples, labs in zip(prompts, labels, strict=True):
        if read == "query" and len(labs) != len(examples) - 1:
            raise ValueError("read='query' takes one label per demonstration (all examples but the last)")
        if read == "all" and len(labs) != len(examples):
            raise ValueError("read='all' takes one label per example")
        ids, pos = encoder.assemble(examples, labs)
        seqs.append(ids)
        positions.append(pos if read == "all" else pos[-1:])
    return seqs, positions


def split_body_head(model):
    """(transformer body, output projection) of a Hugging Face causal LM, PEFT-wrapped or not."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    body = getattr(model, model.base_model_prefix, None)
    head = model.get_output_embeddings()
    if body is None or head is None:
        raise ConfigError(f"{type(model).__name__} is not a causal LM with an output projection")
    return body, head


@runtime_checkable
class LabelScorer(Protocol):
    """What zero-shot, ICL and UICL call on a scorer, whichever backend computes the scores: :class:`Scorer`
    (``hf``), :class:`~joint_inference.scoring.vllm.VLLMScorer` (``vllm``) and
    :class:`~joint_inference.scoring.api.APIScorer` (``openai``) all implement it."""

    encoder: PromptEncoder  # builds the prompts; its label set is the K labels scored
    mode: str  # the label mode, resolved (never ``auto``)
    show_progress: bool

    def label_logprobs(self, prompts: Sequence[Sequence[EncodedExample]], labels: Sequence[Sequence[int]],
                       read: str = "query", desc: str | None = None) -> torch.Tensor:
        """Log-softmax over the K labels at the label positions of each prompt (see :meth:`Scorer.label_logprobs`)."""

    def shared_label_logprobs(self, demonstrations: Sequence[EncodedExample], demo_labels: Sequence[int],
                              queries: Sequence[EncodedExample]) -> torch.Tensor:
        """(Q, K) label log-probs of each query after the same labelled demonstrations."""


class Scorer:
    """Label log-probabilities of a frozen (or LoRA-wrapped) causal LM (the ``hf`` :class:`LabelScorer`)."""

    def __init__(
        self,
        model,
        encoder: PromptEncoder,
        label_mode: str = "auto",
        batch_size: int = 16,
        show_progress: bool = True,
        length_normalised: bool = False,
        batch_tokens: int | None = None,
    ):
        self.model = model
        self.encoder = encoder
        self.mode = resolve_label_mode(label_mode, encoder.label_ids, encoder.label_names)
        if length_normalised and self.mode != "exact":
            raise ConfigError("length-normalised label scores (acc_norm) need label_mode=exact")
        self.length_normalised = length_normalised
        self.batch_size = batch_size  # prompts per forward pass (lowered on out-of-memory)
        self.batch_tokens = batch_tokens  # and at most this many padded tokens, if set
        self.show_progress = show_progress
        self.body, self.head = split_body_head(model)
        config = model.config.get_text_config()  # a VLM keeps its language model's settings there
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.max_length = getattr(config, "max_position_embeddings", None)
        vocab = self.head.weight.shape[0]
        too_big = [n for n, ids in zip(encoder.label_names, encoder.label_ids) if max(ids) >= vocab]
        if too_big:
            raise ConfigError(f"labels {too_big} have token ids beyond the model's {vocab}-row output layer")
        self._label_weights = self._build_label_weights()

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def label_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(output columns the labels read, (K, columns) weights averaging them; see :func:`label_weights`): the
        K label scores are ``weights @ logits[columns]``, a linear read of the final hidden state that a
        fine-tuned linear head can start from. None in ``exact`` mode, which is not linear."""
        return self._label_weights

    # ----------------------------------------------------------------------------- public API
    def label_logprobs(
        self,
        prompts: Sequence[Sequence[EncodedExample]],
        labels: Sequence[Sequence[int]],
        read: str = "query",
        desc: str | None = None,
    ) -> torch.Tensor:
        """Log-softmax over the K labels at the requested label positions of each prompt.

        ``read="query"``: each prompt is demonstrations then one unlabelled query;
        ``labels[i]`` labels the demonstrations; returns ``(P, K)`` at the queries.
        ``read="all"``: every example carries a label in ``labels[i]`` (e.g. sampled ones);
        returns ``(P, M, K)``, where position n is conditioned on the pairs before it.
        Differentiable when autograd is enabled (the task encoder of fine-tuning).
        """
        seqs, positions = assemble_prompts(self.encoder, prompts, labels, read)
        if self.mode == "exact":
            read_examples = [ex for prompt in prompts for ex in (prompt[-1:] if read == "query" else prompt)]
            scores = self._exact_scores(seqs, positions, desc, read_examples)
        else:
            scores = self._run(seqs, positions, self._mixed_label_logits, desc)
        return self._finish(scores, len(seqs), read)

    def _finish(self, scores: torch.Tensor, num_prompts: int, read: str) -> torch.Tensor:
        """Log-softmax over the label set, shaped (P, K) for queries or (P, M, K) for all."""
        scores = torch.log_softmax(scores.float(), dim=-1).view(num_prompts, -1, self.encoder.num_labels)
        return scores[:, 0] if read == "query" else scores

    def shared_label_logprobs(
        self,
        demonstrations: Sequence[EncodedExample],
        demo_labels: Sequence[int],
        queries: Sequence[EncodedExample],
    ) -> torch.Tensor:
        """(Q, K) label log-probs of each query after the same labelled demonstrations.

        The demonstrations run through the model once; their key/value cache is then reused
        by every batch of queries (position ids continue after it). Equal, up to float error,
        to scoring each (demonstrations + query) prompt with :meth:`label_logprobs`.
        """
        if self.mode == "exact" or not getattr(self.model, "supports_prefix_caching", True):
            # exact multi-token labels need branches, OpenFlamingo every image of a row: score whole prompts
            return self.label_logprobs([[*demonstrations, q] for q in queries], [list(demo_labels)] * len(queries))
        if any(not q.prefix for q in queries):
            raise ConfigError("a query has no text before its label; the template needs text before {y}")
        context = self.encoder.context(demonstrations, demo_labels)
        prefix = self.body(**self._inputs(torch.tensor([context], device=self.device)), use_cache=True).cache
        return self._finish(self._run([list(q.prefix) for q in queries], [[len(q.prefix) - 1] for q in queries],
                                      self._mixed_label_logits, None, prefix=prefix), len(queries), "query")

    def query_hidden_states(
        self,
        prompts: Sequence[Sequence[EncodedExample]],
        labels: Sequence[Sequence[int]],
        desc: str | None = None,
    ) -> torch.Tensor:
        """(P, hidden) float32 final hidden states at each prompt's query, where :meth:`label_logprobs` reads
        its labels: the fixed features of a linear task encoder. ``labels[i]`` labels the demonstrations."""
        seqs, positions = assemble_prompts(self.encoder, prompts, labels, "query")
        return self._run(seqs, positions, lambda hidden, _: hidden.float(), desc)

    # ------------------------------------------------------------------------ label projections
    def _build_label_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.mode == "exact":
            return None
        columns, weights = label_weights(self.mode, self.encoder.label_ids)
        return torch.tensor(columns, dtype=torch.long), weights

    def _project(self, hidden: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Output logits for ``hidden`` rows, restricted to ``columns`` (all when None). The label columns are
        read in fp32 whatever the model's dtype (a few rows: free, and the label margins keep their digits)."""
        weight, bias = self.head.weight, getattr(self.head, "bias", None)
        if columns is not None:
            columns = columns.to(weight.device)
            weight = weight.index_select(0, columns).float()
            bias = None if bias is None else bias.index_select(0, columns).float()
        logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _mixed_label_logits(self, hidden: torch.Tensor, _: list) -> torch.Tensor:
        columns, weights = self._label_weights
        return self._project(hidden, columns) @ weights.to(hidden.device).T

    def _exact_scores(self, seqs, positions, desc, read_examples) -> torch.Tensor:
        """Sum of each label's token log-probs, via one branch per (read, multi-token label). Examples with
        labels of their own (``choices``) branch for every label, with their own tokens; with
        ``length_normalised``, each sum is divided by its label's length in characters (lm-eval's ``acc_norm``)."""
        own = read_examples[0].choices is not None
        label_ids = self.encoder.label_ids
        lengths = [len(ids) for ids in label_ids]
        single = [] if own else [k for k, n in enumerate(lengths) if n == 1]
        multi = list(range(len(label_ids))) if own else [k for k, n in enumerate(lengths) if n > 1]
        per_read = [ex.choices if own else label_ids for ex in read_examples]
        single_cols = torch.tensor([label_ids[k][0] for k in single], dtype=torch.long)

        def full_logprobs(hidden, targets):
            logprobs = torch.log_softmax(self._project(hidden), dim=-1)
            return logprobs.gather(1, torch.as_tensor(targets, device=logprobs.device)[:, None])[:, 0]

        reads = [(s, p) for s in range(len(seqs)) for p in positions[s]]
        scores = torch.zeros(len(reads), len(label_ids), device=self.device)
        if single:
            def single_logprobs(hidden, _):
                return torch.log_softmax(self._project(hidden), dim=-1)[:, single_cols.to(hidden.device)]
            scores[:, single] = self._run(seqs, positions, single_logprobs, desc)
        if multi:
            branches, branch_pos, branch_targets = [], [], []
            for r, (s, p) in enumerate(reads):
                for k in multi:
                    ids = per_read[r][k]
                    branches.append(seqs[s][: p + 1] + list(ids[:-1]))
                    branch_pos.append(list(range(p, p + len(ids))))
                    branch_targets.append(list(ids))
            flat = self._run(branches, branch_pos, full_logprobs, desc, targets=branch_targets)
            sums, i = [], 0
            for targets in branch_targets:
                sums.append(flat[i : i + len(targets)].sum())
                i += len(targets)
            scores[:, multi] = torch.stack(sums).view(len(reads), len(multi))
        if self.length_normalised:
            chars = [ex.choice_chars if own else [len(name) for name in self.encoder.label_names]
                     for ex in read_examples]
            scores = scores / torch.tensor(chars, dtype=scores.dtype, device=scores.device)
        return scores

    # ------------------------------------------------------------------------ batched forward
    def _inputs(self, input_ids: torch.Tensor) -> dict:
        """Model inputs for ``input_ids``. Prompts with images hold negative ids: id ``-1 - r`` stands
        for row ``r`` of the encoder's ``image_features`` (image embeddings computed once per image),
        so the sequence is passed as embeddings; text prompts go in as token ids."""
        table = getattr(self.encoder, "image_features", None)
        if table is None:
            return {"input_ids": input_ids}
        embeds = self.body.get_input_embeddings()(input_ids.clamp(min=0))
        rows = table.to(device=embeds.device, dtype=embeds.dtype)[(-1 - input_ids).clamp(min=0)]
        return {"inputs_embeds": torch.where((input_ids < 0).unsqueeze(-1), rows, embeds)}

    def _hidden(self, seqs: list[list[int]], prefix=None) -> tuple[torch.Tensor, list[int]]:
        """Last hidden states of right-padded ``seqs`` (after a shared ``prefix`` cache, if any), flattened to
        (rows x width, hidden), and where each sequence starts in them."""
        width = max(len(s) for s in seqs)
        input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        starts = [row * width for row in range(len(seqs))]
        if prefix is None:
            return self.body(**self._inputs(input_ids.to(self.device)), attention_mask=mask.to(self.device),
                             use_cache=False).last_hidden_state.flatten(0, 1), starts
        offset = prefix.get_seq_length()
        mask = torch.cat([torch.ones(len(seqs), offset, dtype=torch.long), mask], dim=1)
        positions = torch.arange(offset, offset + width).expand(len(seqs), -1)
        return self._after_prefix(prefix, input_ids, mask, positions), starts

    def _after_prefix(self, prefix, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        """Last hidden states of the ``input_ids`` rows, each continuing its own copy of the ``prefix`` cache,
        flattened to (rows x width, hidden)."""
        cache = copy.deepcopy(prefix)  # each batch extends its own copy
        cache.batch_repeat_interleave(len(input_ids))
        return self.body(**self._inputs(input_ids.to(self.device)), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), cache=cache,
                         use_cache=True).last_hidden_state.flatten(0, 1)

    def _packed_hidden(self, seqs: list[list[int]], prefix) -> tuple[torch.Tensor, list[int]]:
        """Last hidden states of ``seqs`` after the ``prefix`` cache, flattened to (rows x width, hidden), and where
        each sequence starts in them: what :meth:`_hidden` computes, with less padding and fewer copies of the
        prefix's keys and values. The sequences are laid end to end in rows twice as long as the longest (first
        fit, longest first); each token attends to the whole prefix and to the earlier tokens of its own
        sequence, at positions that continue after the prefix. Longer rows would pad less but attend more, as
        the mask's kernel computes every (token, key) pair of a row: twice was the fastest of 1-4x
        (docs/speed.md)."""
        offset = prefix.get_seq_length()
        width = 2 * max(len(s) for s in seqs)
        rows, room = [], []
        for i, seq in enumerate(seqs):
            row = next((r for r, free in enumerate(room) if free >= len(seq)), None)
            if row is None:
                rows.append([])
                room.append(width)
                row = len(rows) - 1
            rows[row].append(i)
            room[row] -= len(seq)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        sequence = torch.full((len(rows), width), -1)
        position = torch.zeros((len(rows), width), dtype=torch.long)
        starts = [0] * len(seqs)
        for row, members in enumerate(rows):
            column = 0
            for i in members:
                n = len(seqs[i])
                input_ids[row, column : column + n] = torch.tensor(seqs[i])
                sequence[row, column : column + n] = i
                position[row, column : column + n] = torch.arange(n)
                starts[i] = row * width + column
                column += n
        own = (sequence[:, :, None] == sequence[:, None, :]) & (position[:, :, None] >= position[:, None, :])
        mask = torch.cat([torch.ones(len(rows), width, offset, dtype=torch.bool), own], dim=2)[:, None]
        return self._after_prefix(prefix, input_ids, mask, offset + position), starts

    def _packable(self, offset: int, seqs: list[list[int]]) -> bool:
        """Whether sequences after an ``offset``-token prefix cache run packed (:meth:`_packed_hidden`): with a
        token budget per pass (the CPU default; GPUs keep padded batches, not measured packed yet), under SDPA
        attention (which takes the custom mask), and with no sliding window or attention chunk cutting into what
        a token sees (the one mask serves every layer)."""
        config = self.model.config.get_text_config()
        limits = [getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size")]
        longest = offset + max(len(s) for s in seqs)
        return (self.batch_tokens is not None and config._attn_implementation == "sdpa"
                and all(limit is None or longest <= limit for limit in limits))

    def _run(
        self,
        seqs: list[list[int]],
        positions: list[list[int]],
        reduce: Callable[[torch.Tensor, list], torch.Tensor],
        desc: str | None,
        targets: list[list[int]] | None = None,
        prefix=None,
    ) -> torch.Tensor:
        """Run the body over ``seqs`` longest first, ``reduce`` the hidden states at
        ``positions`` (with the matching ``targets``), and return rows in input order.
        With a ``prefix`` key/value cache, every sequence continues after it, packed where it can."""
        offset = prefix.get_seq_length() if prefix is not None else 0
        longest = offset + max(len(s) for s in seqs)
        if self.max_length and longest > self.max_length:
            raise ConfigError(
                f"a prompt has {longest} tokens but the model's context is {self.max_length}; "
                "lower N (demonstrations per prompt) or use a model with a longer context"
            )
        packed = prefix is not None and self._packable(offset, seqs)
        out: list[torch.Tensor | None] = [None] * len(seqs)

        def process(idx):
            hidden, starts = (self._packed_hidden if packed else self._hidden)([seqs[i] for i in idx], prefix)
            reads = torch.tensor([start + p for start, i in zip(starts, idx) for p in positions[i]],
                                 device=hidden.device)
            flat_targets = [t for i in idx for t in targets[i]] if targets is not None else []
            reduced = reduce(hidden[reads], flat_targets)
            for i, chunk in zip(idx, reduced.split([len(positions[i]) for i in idx])):
                out[i] = chunk

        self.batch_size = in_batches_longest_first([len(s) for s in seqs], self.batch_size, process, desc,
                                                   self.show_progress, self.batch_tokens, packed)
        return torch.cat(out)
