"""Classification through an OpenAI-compatible server: label log-probs read from its answers.

Every prompt is the one the ``hf`` scorer scores: the same token ids (:func:`~joint_inference.scoring.scorer.assemble_prompts`),
sent as ids to ``/completions`` (``model.prompt_format=tokens``: exact wherever the server's tokenizer is the local
one, as with vLLM serving the same model), or as their decoded text (``prompt_format=text``, or the chat endpoint,
whose server adds its chat template around it). ``prompt_format=auto`` (the default) asks the server which it takes
(:mod:`~joint_inference.api.capabilities`: llama.cpp's server takes text only).

Two ways to read the labels (``model.score_with``):

* **top_logprobs**: a one-token greedy completion with the ``model.max_top_logprobs`` most likely next tokens;
  each label's token is found among them by its text (or by id with vLLM's ``return_tokens_as_token_ids``,
  ``model.tokens_as_ids=true``), and the K label scores are renormalised with a log-softmax, as the ``hf``
  scorer does. One request a prompt.
* **echo**: the prompt followed by each label's tokens, echoed with their log-probs (``echo`` + ``logprobs``);
  the label's log-prob is read from the echoed positions. Exact for every label mode, multi-token ``exact``
  included. One request a label.

``auto`` (the default) reads the top-k first; a read missing a label is asked again with the server's most
alternatives and, where the server echoes, the reads still missing one are scored with echo, so every score is
exact. Without echo, **labels outside the top-k** get a floor log-prob: the lower of the smallest log-prob
returned and the log of the probability mass the returned tokens leave, an upper bound on the label's true
log-prob; the prediction is still exact where one label is found (a label found beats every floored one), and
the number of floored reads is logged. **A read with no label in the top-k is never guessed**: the scorer stops
with a ConfigError that counts such reads and names the settings that fix them.

Label modes of top-k reads: ``first`` and ``auto`` (``first`` when the first tokens differ, after the shared
leading tokens fold into the prompt), ``bot`` and ``bot_minimal`` (their tokens are all read at the label
position), and ``exact`` with one-token labels; with echo, every mode. Refused with a :class:`ConfigError` naming
the way out, where echo is not available: multi-token ``exact`` (``auto`` where first tokens collide), label tokens
more than the server returns (top_logprobs: 20 for OpenAI's chat and vLLM's default, 5 for OpenAI's completions),
a server that returns no log-probs; and fine-tuning's every-label reads.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import torch

from ..api import capabilities
from ..api.client import ENDPOINTS, APIClient
from ..core.errors import ConfigError
from ..prompts.templates import EncodedExample, PromptEncoder
from .scorer import assemble_prompts, label_weights, resolve_label_mode

log = logging.getLogger(__name__)
PROMPT_FORMATS = ("auto", "tokens", "text")
SCORE_WITH = ("auto", "echo", "top_logprobs")
PROBE_TEXT = "One, two, three, four"  # the capability probe's prompt
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
    """Label log-probabilities from a server: the :class:`~joint_inference.scoring.scorer.LabelScorer` of
    ``backend=openai``. Returns CPU tensors.

    ``prompt_format``/``score_with`` ``auto`` ask the server what it can do first
    (:mod:`~joint_inference.api.capabilities`): token ids where it takes them, else text; echo (each label's
    exact log-prob after the prompt) where it returns prompt log-probs, else the next token's top log-probs."""

    device = torch.device("cpu")

    def __init__(self, client: APIClient, encoder: PromptEncoder, label_mode: str = "auto", *,
                 endpoint: str = "completions", prompt_format: str = "tokens", max_top_logprobs: int = 20,
                 tokens_as_ids: bool = False, score_with: str = "top_logprobs"):
        if endpoint not in ENDPOINTS:
            raise ConfigError(f"model.endpoint must be one of {list(ENDPOINTS)}, got {endpoint!r}")
        if prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"model.prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        if score_with not in SCORE_WITH:
            raise ConfigError(f"model.score_with must be one of {SCORE_WITH}, got {score_with!r}")
        if max_top_logprobs < 1:
            raise ConfigError(f"model.max_top_logprobs must be at least 1, got {max_top_logprobs}")
        if endpoint == "chat" and score_with == "echo":
            raise ConfigError("model.score_with=echo needs model.endpoint=completions: chat endpoints do not return "
                              "the prompt's log-probs. Use model.score_with=top_logprobs (or auto) on the chat endpoint")
        self.client, self.encoder, self.label_mode = client, encoder, label_mode
        self.endpoint, self.prompt_format = endpoint, "text" if endpoint == "chat" else prompt_format
        self.score_with = "top_logprobs" if endpoint == "chat" else score_with
        self.k, self.tokens_as_ids = max_top_logprobs, tokens_as_ids
        self.server_top: int | None = None  # the most alternatives the server returns, where probed
        self.echo = score_with == "echo"  # whether reads a top-k cannot complete are scored with echo
        self.batch_size = None  # the server batches
        self.show_progress = client.settings.show_progress  # the client draws the request bars
        self.floored = self.reads = 0
        if self.score_with == "top_logprobs":
            self._read_top_logprobs()  # what a top-k read cannot give is refused at once
        else:
            self.mode = resolve_label_mode(label_mode, encoder.label_ids, encoder.label_names)
            self.columns, self.weights = label_weights(self.mode, encoder.label_ids)
        self._resolved = self.prompt_format != "auto" and self.score_with == "top_logprobs" and endpoint != "chat"

    def _read_top_logprobs(self) -> None:
        self.score_with, self.echo = "top_logprobs", False
        self.mode = api_label_mode(self.label_mode, self.encoder, self.k)
        self.columns, self.weights = label_weights(self.mode, self.encoder.label_ids)
        self._lookup = self._build_lookup()

    def _resolve(self) -> None:
        """Settle ``auto`` settings from the server's capabilities (asked once; a dry run reads the kept ones)."""
        if self._resolved:
            return
        tokenizer = self.encoder.tokenizer
        words = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
        if self.client.dry_run:
            caps = capabilities.cached(self.client, self.endpoint)
            if caps is None and self.score_with == "auto":  # the summary says what the count assumed
                self.client.tally.unprobed += 1
        else:
            caps = capabilities.probe(self.client, self.endpoint, list(self.encoder.bos) + words, PROBE_TEXT,
                                      prompt_words=len(words))
        self._resolved = True
        if self.prompt_format == "auto":
            self.prompt_format = "text" if caps is not None and caps.token_prompts is False else "tokens"
        if self.score_with == "echo" and caps is not None and not caps.echo:
            raise ConfigError(f"model.score_with=echo, but the server at {self.client.settings.base_url} returns no "
                              "prompt log-probs with echo. Start it with them (llama-cpp-python's server: "
                              "--logits_all true; vLLM returns them) or set model.score_with=auto")
        if caps is not None:
            self.server_top = caps.top_logprobs
            if self.endpoint == "chat":
                self._check_chat_template(caps)
        if self.score_with == "auto":
            self.echo = caps is not None and bool(caps.echo)
            if not self.echo:
                self._read_top_logprobs()  # what top-k reads cannot give is refused here
            elif not self._top_reads_can_serve():
                self.score_with = "echo"
        log.info("backend=openai scores labels %s; prompts sent as %s", {
            "echo": "with echo (each label's exact log-prob after the prompt, one request a label)",
            "top_logprobs": f"from the top {self.k} log-probs of the next token",
            "auto": f"from the top {self.k} log-probs of the next token, the reads that miss a label again with "
                    f"{self.server_top} and then with echo (exact)"}[self.score_with], self.prompt_format)

    def _top_reads_can_serve(self) -> bool:
        """Whether top-k reads can score this label set (one next-token read, label tokens told apart by text)."""
        try:
            api_label_mode(self.label_mode, self.encoder, self.k)
            self._lookup = self._build_lookup()
        except ConfigError:
            return False
        return True

    def _check_chat_template(self, caps) -> None:
        """Warn where the server's chat prompt is not the model's chat template (it falls back to a format of its
        own: the prompts it scores are not the ones meant)."""
        tokenizer = self.encoder.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            log.warning("model.endpoint=chat, but %s has no chat template: the server wraps each prompt in a format "
                        "of its own, so the scores are not those of the prompts themselves; model.endpoint="
                        "completions scores them as they are", getattr(tokenizer, "name_or_path", "the tokenizer"))
            return
        want = len(tokenizer.apply_chat_template(capabilities.PROBE_MESSAGE, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))
        if caps.chat_prompt_tokens is not None and caps.chat_prompt_tokens != want:
            log.warning("the server's chat prompt for one short message has %d tokens where the model's chat template "
                        "gives %d: it formats chats its own way (llama.cpp: a template from the GGUF, or its "
                        "fallback), so the scores differ from backend=hf's; model.endpoint=completions scores the "
                        "prompts themselves", caps.chat_prompt_tokens, want)

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

    def _prompt(self, seq: list[int]):
        return list(seq) if self.prompt_format == "tokens" else self.prompt_text(seq)

    def request(self, seq: list[int], k: int | None = None) -> dict:
        """A one-token completion with the ``k`` (default ``model.max_top_logprobs``) most likely next tokens."""
        k = k or self.k
        if self.endpoint == "chat":
            fields = {"messages": [{"role": "user", "content": self.prompt_text(seq)}], "max_tokens": 1,
                      "temperature": 0, "logprobs": True, "top_logprobs": k}
        else:
            fields = {"prompt": self._prompt(seq), "max_tokens": 1, "temperature": 0, "logprobs": k}
        if self.tokens_as_ids:
            fields["return_tokens_as_token_ids"] = True
        return self.client.body(fields)

    def echo_request(self, seq: list[int]) -> dict:
        """The prompt echoed with its own token log-probs (and one greedy token, which is not read)."""
        return self.client.body({"prompt": self._prompt(seq), "max_tokens": 1, "temperature": 0, "echo": True,
                                 "logprobs": 1})

    def _score(self, seqs: list[list[int]], desc: str | None) -> torch.Tensor:
        if not seqs:
            return torch.empty(0, self.encoder.num_labels)
        self._resolve()
        if self.prompt_format == "text":
            self._check_round_trip(seqs)
        return self._echo_scores(seqs, desc) if self.score_with == "echo" else self._top_scores(seqs, desc)

    # ------------------------------------------------------------------------------ echo: exact
    def continuations(self) -> list[list[int]]:
        """What follows each prompt in the echo requests: every label's tokens (``exact`` with multi-token
        labels) or else every label column's token (the scores are then averages of next-token log-probs, as
        the top-k reads give them)."""
        if self._by_label():
            return [list(ids) for ids in self.encoder.label_ids]
        return [[c] for c in self.columns]

    def _by_label(self) -> bool:
        return self.mode == "exact" and any(len(ids) > 1 for ids in self.encoder.label_ids)

    def _echo_scores(self, seqs: list[list[int]], desc: str | None) -> torch.Tensor:
        """The hf scorer's scores from the log-probs the server gives the label tokens after each prompt."""
        rows = self._echo_rows(seqs, desc)
        self.reads += len(seqs)
        return torch.log_softmax(rows if self._by_label() else rows @ self.weights.T, dim=-1)

    def _echo_rows(self, seqs: list[list[int]], desc: str | None) -> torch.Tensor:
        """(P, continuations) log-probs of each continuation after each prompt: one echo request per pair."""
        conts = self.continuations()
        full = [list(s) + c for s in seqs for c in conts]
        answers = self.client.post_many(ENDPOINTS["completions"], [self.echo_request(f) for f in full], desc,
                                        prompt_tokens=[len(f) for f in full], check=self.unechoed)
        values = [0.0 if answer is None else self._continuation_logprob(answer, f, len(c))  # None: a dry run
                  for answer, f, c in zip(answers, full, conts * len(seqs))]
        return torch.tensor(values, dtype=torch.float32).view(len(seqs), len(conts))

    def unechoed(self, answer: dict) -> str | None:
        """What keeps an echo answer from being read, or None."""
        values = capabilities.prompt_logprobs(answer)
        if len([v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]) < 1:
            return (f"the server at {self.client.settings.url(ENDPOINTS['completions'])} answered an echo request "
                    "without the prompt's token log-probs; set model.score_with=top_logprobs")
        return None

    def _continuation_logprob(self, answer: dict, seq: list[int], length: int) -> float:
        """The summed log-prob of the last ``length`` tokens of ``seq`` in an echo answer: for token prompts, the
        last of the prompt's (servers differ in whether a BOS is listed; the generated tokens, which the usage
        counts, come after); for text prompts, those at the continuation's character offsets (the server
        tokenized the text)."""
        logprobs = answer["choices"][0]["logprobs"]
        values = logprobs["token_logprobs"]
        generated = (answer.get("usage") or {}).get("completion_tokens")
        if self.prompt_format == "tokens" and isinstance(generated, int):  # the prompt's tokens, less a BOS or not
            picked = values[:len(values) - generated][-length:]
        else:
            start, end = len(self.prompt_text(seq[:-length])), len(self.prompt_text(seq))
            offsets = logprobs.get("text_offset") or []
            picked = [v for v, at in zip(values, offsets) if start <= at < end]
        if not picked or any(not isinstance(v, (int, float)) for v in picked):
            raise ConfigError(f"the server at {self.client.settings.base_url} echoed the prompt without log-probs "
                              f"for the label's tokens (text_offset/token_logprobs missing or short); set "
                              "model.score_with=top_logprobs")
        return float(sum(picked))

    # ------------------------------------------------------------------------ top_logprobs: reads
    def _top_scores(self, seqs: list[list[int]], desc: str | None) -> torch.Tensor:
        """Label scores from next-token top-k reads. A read missing a label is asked again with the server's most
        alternatives, then (``score_with=auto`` on a server that echoes) scored with echo, so that every score
        is exact; without echo a read missing some labels gets their floor (its prediction stays exact) and one
        missing all of them stops the run."""
        answers = self._ask_top(seqs, self.k, desc)
        reads = [self._read(a) for a in answers]
        k = self.k
        missing = [i for i, (_, _, complete) in enumerate(reads) if not complete]
        if missing and self.server_top and self.server_top > k:  # never a guess: ask those again with more
            k = self.server_top
            log.info("%d of %d reads missed a label among the top %d next tokens; asking them again for %d",
                     len(missing), len(seqs), self.k, k)
            for i, answer in zip(missing, self._ask_top([seqs[i] for i in missing], k, desc)):
                reads[i] = self._read(answer)
            missing = [i for i, (_, _, complete) in enumerate(reads) if not complete]
        rows = torch.tensor([row for row, _, _ in reads], dtype=torch.float32)
        if missing and self.echo:
            log.info("%d of %d reads missed a label among the top %d next tokens; scoring them with echo",
                     len(missing), len(seqs), k)
            rows[missing] = self._echo_rows([seqs[i] for i in missing], desc)
            missing = []
        blind = [i for i in missing if not reads[i][1]]
        if blind:
            raise ConfigError(
                f"{len(blind)} of {len(seqs)} reads had none of the label tokens ({', '.join(map(repr, self.encoder.label_names))}"
                f") among the {k} most likely next tokens that the server at "
                f"{self.client.settings.url(ENDPOINTS[self.endpoint])} returned, so their predictions would be guesses "
                f"and none is made. Raise model.max_top_logprobs (now {self.k}) as far as the server allows (llama.cpp's "
                "server: any number; vLLM: up to its --max-logprobs; OpenAI: 20 on chat, 5 on completions), use a "
                "server that echoes prompt log-probs (model.score_with=auto), check that the template leads to the "
                "labels, " + WAY_OUT + ". The answers so far are cached")
        self.reads, self.floored = self.reads + len(seqs), self.floored + len(missing)
        if missing:
            log.warning("%d of %d reads had label tokens outside the server's top %d; they got the floor log-prob "
                        "(joint_inference/scoring/api.py)", len(missing), len(seqs), k)
        return torch.log_softmax(rows @ self.weights.T, dim=-1)

    def _ask_top(self, seqs: list[list[int]], k: int, desc: str | None) -> list:
        return self.client.post_many(ENDPOINTS[self.endpoint], [self.request(s, k) for s in seqs], desc,
                                     prompt_tokens=[len(s) for s in seqs], check=self.unreadable)

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

    def _read(self, answer: dict | None) -> tuple[list[float], bool, bool]:
        """(the label columns' log-probs of one answer, a column outside the top-k getting the floor; whether any
        label column was found; whether all were)."""
        if answer is None:  # a dry run's stand-in for what is not cached: equal scores keep the run going
            return [0.0] * len(self.columns), True, True
        pairs = self._top(answer)
        found: dict[int, float] = {}
        for token, logprob in pairs:
            match = TOKEN_ID.match(token) if self.tokens_as_ids else None
            column = (self.columns.index(int(match[1])) if match and int(match[1]) in self.columns
                      else None if match else self._lookup.get(token))
            if column is not None and logprob is not None:
                found[column] = max(found.get(column, -math.inf), float(logprob))
        if len(found) < len(self.columns):
            values = [float(lp) for _, lp in pairs if lp is not None and math.isfinite(float(lp))]
            rest = 1.0 - sum(math.exp(v) for v in values)
            floor = min(min(values, default=-100.0), math.log(rest) if rest > 1e-30 else -69.0)
            return [found.get(c, floor) for c in range(len(self.columns))], bool(found), False
        return [found[c] for c in range(len(self.columns))], True, True
