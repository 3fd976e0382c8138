"""Classification through an OpenAI-compatible server: label log-probs from the next token's ``top_logprobs``.

Every prompt is the one the ``hf`` scorer scores: the same token ids (:func:`~joint_inference.scoring.scorer.assemble_prompts`),
sent as ids to ``/completions`` (``model.prompt_format=tokens``, the default: exact wherever the server's tokenizer
is the local one, as with vLLM serving the same model), or as their decoded text (``prompt_format=text``, or the
chat endpoint, whose server adds its chat template around it). The server answers a one-token completion
(``max_tokens=1``, greedy) with the ``model.max_top_logprobs`` most likely next tokens and their log-probs;
each label's token is found among them by its text (or by id with vLLM's ``return_tokens_as_token_ids``,
``model.tokens_as_ids=true``), and the K label scores are renormalised with a log-softmax, as the ``hf``
scorer does.

**Labels outside the top-k** get a floor log-prob: the lower of the smallest log-prob returned and the log of
the probability mass the returned tokens leave, an upper bound on the label's true log-prob (the label is
not more likely than the k-th token, nor than everything not returned). Where every label token is in the
top-k, the scores equal the ``hf`` scorer's; where one is, the prediction is still exact (a label found beats
every floored one) and the number of floored reads is logged. **A read with no label in the top-k is never
guessed**: the scorer stops with a ConfigError that counts such reads and names the settings that fix them.

Label modes: ``first`` and ``auto`` (``first`` when the first tokens differ, after the shared leading tokens
fold into the prompt), ``bot`` and ``bot_minimal`` (their tokens are all read at the label position), and
``exact`` with one-token labels. Refused with a :class:`ConfigError` naming the way out: multi-token ``exact``
(``auto`` where first tokens collide), label tokens more than the server returns (top_logprobs: 20 for
OpenAI's chat and vLLM's default, 5 for OpenAI's completions), a server that returns no log-probs, and
fine-tuning's every-label reads.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import torch

from ..api.client import ENDPOINTS, APIClient
from ..core.errors import ConfigError
from ..prompts.templates import EncodedExample, PromptEncoder
from .scorer import assemble_prompts, label_weights, resolve_label_mode

log = logging.getLogger(__name__)
PROMPT_FORMATS = ("tokens", "text")
TOKEN_ID = re.compile(r"^token_id:(\d+)$")
WAY_OUT = "or use backend=hf / backend=vllm, which read every label's log-prob"


def api_label_mode(label_mode: str, encoder: PromptEncoder, max_top_logprobs: int) -> str:
    """``label_mode`` resolved as the hf scorer does, refusing what one next-token top-k cannot give."""
    firsts: dict[int, list[str]] = {}
    for name, ids in zip(encoder.label_names, encoder.label_ids):
        firsts.setdefault(ids[0], []).append(name)
    shared = [names for names in firsts.values() if len(names) > 1]
    if label_mode in ("auto", "first", "exact") and shared:
        raise ConfigError(
            f"backend=openai reads one next-token distribution per prompt, and labels {shared} share their first "
            f"token (label_mode={label_mode} would need their later tokens). Use label_mode=bot_minimal or bot (they "
            f"read the tokens that tell the labels apart at the same position), rename the labels, {WAY_OUT}")
    mode = resolve_label_mode(label_mode, encoder.label_ids, encoder.label_names)
    multi = [name for name, ids in zip(encoder.label_names, encoder.label_ids) if len(ids) > 1]
    if mode == "exact" and multi:
        raise ConfigError(f"backend=openai cannot score label_mode=exact with multi-token labels {multi}: it reads only "
                          f"the next token. Use label_mode=first, bot or bot_minimal, {WAY_OUT}")
    columns, _ = label_weights(mode, encoder.label_ids)
    if len(columns) > max_top_logprobs:
        raise ConfigError(
            f"label_mode={mode} reads {len(columns)} distinct label tokens ({encoder.num_labels} labels), but the server "
            f"returns at most model.max_top_logprobs={max_top_logprobs} alternatives per position (top_logprobs: 20 on "
            "OpenAI's chat endpoint and vLLM's default, 5 on OpenAI's completions), so some labels could never be read. "
            "Use a label set with fewer labels (labelset=...), label_mode=first where the first tokens differ, a server "
            f"that returns more (vLLM --max-logprobs 100 with model.max_top_logprobs=100), {WAY_OUT}")
    return mode


def token_forms(tokenizer, token_id: int) -> list[str]:
    """How servers write a token in ``top_logprobs``: its text as it reads after other text (``" positive"``,
    what vLLM's and OpenAI's detokenizers give) and its raw vocabulary entry (``"Ġpositive"``, ``"▁positive"``)."""
    forms = []
    context = tokenizer.encode("a", add_special_tokens=False)
    base = tokenizer.decode(context)
    full = tokenizer.decode(context + [token_id])
    if full.startswith(base):
        forms.append(full[len(base):])
    raw = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(raw, str) and raw not in forms:
        forms.append(raw)
    return forms


class APIScorer:
    """Label log-probabilities from a server's next-token ``top_logprobs``: the
    :class:`~joint_inference.scoring.scorer.LabelScorer` of ``backend=openai``. Returns CPU tensors."""

    device = torch.device("cpu")

    def __init__(self, client: APIClient, encoder: PromptEncoder, label_mode: str = "auto", *,
                 endpoint: str = "completions", prompt_format: str = "tokens", max_top_logprobs: int = 20,
                 tokens_as_ids: bool = False):
        if endpoint not in ENDPOINTS:
            raise ConfigError(f"model.endpoint must be one of {list(ENDPOINTS)}, got {endpoint!r}")
        if prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"model.prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        if max_top_logprobs < 1:
            raise ConfigError(f"model.max_top_logprobs must be at least 1, got {max_top_logprobs}")
        self.client, self.encoder = client, encoder
        self.endpoint, self.prompt_format = endpoint, "text" if endpoint == "chat" else prompt_format
        self.k, self.tokens_as_ids = max_top_logprobs, tokens_as_ids
        self.mode = api_label_mode(label_mode, encoder, max_top_logprobs)
        self.columns, self.weights = label_weights(self.mode, encoder.label_ids)
        self.batch_size = None  # the server batches
        self.show_progress = client.settings.show_progress  # the client draws the request bars
        self.floored = self.reads = 0
        self._lookup = self._build_lookup()

    def _build_lookup(self) -> dict[str, int]:
        """{token text or raw token: column} for the label tokens; a text shared by two of them is ambiguous."""
        tokenizer, owners = self.encoder.tokenizer, {}
        for c, token in enumerate(self.columns):
            for form in token_forms(tokenizer, token):
                owners.setdefault(form, set()).add(c)
        lookup = {form: next(iter(cs)) for form, cs in owners.items() if len(cs) == 1}
        unreadable = [tokenizer.convert_ids_to_tokens(t) for c, t in enumerate(self.columns)
                      if c not in lookup.values()]
        if unreadable and not self.tokens_as_ids:
            raise ConfigError(f"label tokens {unreadable} read as the same text as other label tokens, so a server's "
                              "top_logprobs cannot tell them apart; with vLLM set model.tokens_as_ids=true (tokens come "
                              f"back as ids), rename the labels, {WAY_OUT}")
        return lookup

    # ----------------------------------------------------------------------------------- public API
    def label_logprobs(self, prompts: Sequence[Sequence[EncodedExample]], labels: Sequence[Sequence[int]],
                       read: str = "query", desc: str | None = None) -> torch.Tensor:
        """(P, K) log-softmax over the K labels at each prompt's query, as ``Scorer.label_logprobs``."""
        if read == "all":
            raise ConfigError("backend=openai scores only the query's label (read='query'); reading every example's "
                              "label (fine-tuning) needs backend=hf")
        seqs, _ = assemble_prompts(self.encoder, prompts, labels, read)
        return self._score(seqs, desc)

    def shared_label_logprobs(self, demonstrations: Sequence[EncodedExample], demo_labels: Sequence[int],
                              queries: Sequence[EncodedExample]) -> torch.Tensor:
        """(Q, K) label log-probs of each query after the same demonstrations (whole prompts)."""
        return self.label_logprobs([[*demonstrations, q] for q in queries], [list(demo_labels)] * len(queries))

    # ------------------------------------------------------------------------------------ requests
    def prompt_text(self, seq: list[int]) -> str:
        """The text of a prompt's token ids, less the BOS token the server's tokenizer adds itself."""
        bos = list(self.encoder.bos)
        ids = seq[len(bos):] if bos and seq[:len(bos)] == bos else seq
        return self.encoder.tokenizer.decode(ids)

    def request(self, seq: list[int]) -> dict:
        if self.endpoint == "chat":
            fields = {"messages": [{"role": "user", "content": self.prompt_text(seq)}], "max_tokens": 1,
                      "temperature": 0, "logprobs": True, "top_logprobs": self.k}
        else:
            prompt = list(seq) if self.prompt_format == "tokens" else self.prompt_text(seq)
            fields = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": self.k}
        if self.tokens_as_ids:
            fields["return_tokens_as_token_ids"] = True
        return self.client.body(fields)

    def _score(self, seqs: list[list[int]], desc: str | None) -> torch.Tensor:
        if not seqs:
            return torch.empty(0, self.encoder.num_labels)
        if self.prompt_format == "text":
            self._check_round_trip(seqs)
        answers = self.client.post_many(ENDPOINTS[self.endpoint], [self.request(s) for s in seqs], desc,
                                        prompt_tokens=[len(s) for s in seqs], check=self.unreadable)
        floored_before = self.floored
        # a dry run answers what is not cached with None: equal label scores keep the run going for the tally
        reads = [([0.0] * len(self.columns), True) if answer is None else self._read(answer) for answer in answers]
        blind = sum(not found for _, found in reads)
        if blind:
            raise ConfigError(
                f"{blind} of {len(seqs)} reads had none of the label tokens ({', '.join(map(repr, self.encoder.label_names))}"
                f") among the {self.k} most likely next tokens that the server at "
                f"{self.client.settings.url(ENDPOINTS[self.endpoint])} returned, so their predictions would be guesses "
                f"and none is made. Raise model.max_top_logprobs (now {self.k}) as far as the server allows (llama.cpp's "
                "server: any number; vLLM: up to its --max-logprobs; OpenAI: 20 on chat, 5 on completions), check that "
                "the template leads to the labels, " + WAY_OUT + ". The answers so far are cached")
        rows = [row for row, _ in reads]
        if self.floored > floored_before:
            log.warning("%d of %d reads had label tokens outside the server's top %d; they got the floor log-prob "
                        "(joint_inference/scoring/api.py)", self.floored - floored_before, len(seqs), self.k)
        return torch.log_softmax(torch.tensor(rows, dtype=torch.float32) @ self.weights.T, dim=-1)

    def _check_round_trip(self, seqs: list[list[int]]) -> None:
        tokenizer = self.encoder.tokenizer
        differ = sum(tokenizer(self.prompt_text(s))["input_ids"] != list(s) for s in seqs[:64])
        if differ:
            log.warning("%d of the first %d prompts tokenize back to other ids than the hf backend scores (a server "
                        "with this tokenizer reads slightly different prompts); model.prompt_format=tokens sends the "
                        "ids themselves", differ, min(64, len(seqs)))

    def unreadable(self, answer: dict) -> str | None:
        """What keeps an answer from being read (it is then neither used nor cached), or None."""
        try:
            pairs = self._top(answer)
            if not all(isinstance(token, str) and (lp is None or isinstance(lp, (int, float)) and not
                                                   isinstance(lp, bool)) for token, lp in pairs):
                raise TypeError("a token that is not text, or a log-prob that is not a number")
        except ConfigError as err:
            return str(err)
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            return (f"the server at {self.client.settings.url(ENDPOINTS[self.endpoint])} answered with top log-probs "
                    f"in a form this client cannot read ({type(err).__name__}: {err})")
        return None

    def _top(self, answer: dict) -> list[tuple[str, float]]:
        """(token, log-prob) pairs of the first generated token's top alternatives."""
        choice = answer["choices"][0]
        logprobs = choice.get("logprobs") or {}
        if self.endpoint == "chat":
            content = logprobs.get("content") or []
            top = content[0].get("top_logprobs") if content else None
            pairs = [(t["token"], t["logprob"]) for t in top or []]
        else:
            tops = logprobs.get("top_logprobs") or []
            pairs = list(tops[0].items()) if tops and isinstance(tops[0], dict) else []
        if not pairs:
            raise ConfigError(
                f"the server at {self.client.settings.url(ENDPOINTS[self.endpoint])} returned no log-probs for model "
                f"{self.client.settings.model!r} (it ignores or lacks 'logprobs'); classification reads the labels from "
                f"the next token's top_logprobs. Use a server that returns them (vLLM; OpenAI's chat endpoint: "
                f"model.endpoint=chat), {WAY_OUT}. Generation tasks (gsm8k, mmlu_pro, mmmu) need no log-probs")
        return pairs

    def _read(self, answer: dict) -> tuple[list[float], bool]:
        """(the label columns' log-probs of one answer, a column outside the top-k getting the floor; whether
        any label column was found)."""
        pairs = self._top(answer)
        found: dict[int, float] = {}
        for token, logprob in pairs:
            match = TOKEN_ID.match(token) if self.tokens_as_ids else None
            column = (self.columns.index(int(match[1])) if match and int(match[1]) in self.columns
                      else None if match else self._lookup.get(token))
            if column is not None and logprob is not None:
                found[column] = max(found.get(column, -math.inf), float(logprob))
        self.reads += 1
        if len(found) < len(self.columns):
            self.floored += 1
            values = [float(lp) for _, lp in pairs if lp is not None and math.isfinite(float(lp))]
            rest = 1.0 - sum(math.exp(v) for v in values)
            floor = min(min(values, default=-100.0), math.log(rest) if rest > 1e-30 else -69.0)
            return [found.get(c, floor) for c in range(len(self.columns))], bool(found)
        return [found[c] for c in range(len(self.columns))], True
