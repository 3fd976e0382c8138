"""Generation through an OpenAI-compatible server, the interface of the local generators:

    generator.generate(prompts, num_samples, seed=0) -> list[list[str]]   # num_samples texts per prompt

A prompt is a text (GSM8K, MMLU-Pro: sent to ``/completions`` as is, or with ``model.endpoint=chat`` as one user
message) or a list of chat messages (MMMU: always ``/chat/completions``). Every response is cut with
:func:`~joint_inference.scoring.generators.cut_at_stop` as the local backends cut theirs, so answer extraction sees
the same text: the template's ``stop`` strings also go to the server (at most ``model.max_stop_strings``; OpenAI
takes 4), its ``stop_after`` strings ("answer is (C)", kept) are applied here only (servers drop a stop
string from the text), so tokens after them are generated and paid for. Temperature 0 is greedy: one request
per prompt, its text repeated for the samples; otherwise one request asks ``n=num_samples`` with a seed.
"""
from __future__ import annotations

import logging

from ..api.client import ENDPOINTS, APIClient
from ..core.errors import ConfigError
from .generators import SamplingSettings, cut_at_stop

log = logging.getLogger(__name__)


def stand_in_response(tokens: int) -> str:
    """A dry run's response: about ``tokens`` tokens ending in statements every task reads (GSM8K's number,
    MMLU-Pro's "answer is (A)", MMMU's "Answer: A"), so the rounds have a pool of demonstrations."""
    return "x " * max(0, tokens - 16) + "The answer is 0. So the answer is (A).\nAnswer: A"


class APIGenerator:
    def __init__(self, client: APIClient, settings: SamplingSettings, endpoint: str = "completions",
                 max_stop_strings: int = 4, seed: int | None = None):
        if endpoint not in ENDPOINTS:
            raise ConfigError(f"model.endpoint must be one of {list(ENDPOINTS)}, got {endpoint!r}")
        self.client, self.settings, self.endpoint = client, settings, endpoint
        self.stop = list(settings.stop)[:max_stop_strings] if max_stop_strings else []
        if len(settings.stop) > len(self.stop):
            log.info("sending %d of the %d stop strings to the server (model.max_stop_strings); all of them cut the "
                     "responses here", len(self.stop), len(settings.stop))
        self.seed = seed  # sent with greedy requests too when set (the original MMMU script sends seed=0)
        self.takes_n: bool | None = None  # whether the server answers n choices to one request (asked once)

    def body(self, prompt, n: int, seed: int) -> tuple[str, dict]:
        s = self.settings
        fields: dict = {"max_tokens": s.max_new_tokens, "temperature": s.temperature}
        if not s.greedy:
            fields.update(top_p=s.top_p, n=n, seed=seed)
        elif self.seed is not None:
            fields["seed"] = self.seed
        if self.stop:
            fields["stop"] = self.stop
        if isinstance(prompt, list):
            return ENDPOINTS["chat"], self.client.body({"messages": prompt, **fields})
        if self.endpoint == "chat":
            return ENDPOINTS["chat"], self.client.body({"messages": [{"role": "user", "content": prompt}], **fields})
        return ENDPOINTS["completions"], self.client.body({"prompt": prompt, **fields})

    def generate(self, prompts: list, num_samples: int = 1, seed: int = 0, desc: str = "generating") -> list[list[str]]:
        s = self.settings
        n = 1 if s.greedy else num_samples
        if n > 1 and prompts and not self.check_n(prompts[0], n, seed):  # n separate requests per prompt instead
            texts = self.answer([self.body(p, 1, (seed * 1_000_003 + i) * 1_000 + j) for i, p in enumerate(prompts)
                                 for j in range(n)], 1, desc)
            return [[t for sample in texts[i * n:(i + 1) * n] for t in sample] for i in range(len(prompts))]
        texts = self.answer([self.body(p, n, seed * 1_000_003 + i) for i, p in enumerate(prompts)], n, desc)
        return [t * num_samples if s.greedy else t for t in texts]

    def check_n(self, prompt, n: int, seed: int) -> bool:
        """Whether the server answers ``n`` choices to one request, asked once with the first prompt (llama.cpp's
        server ignores ``n`` and answers one); said once when it does not."""
        if self.takes_n is None and not self.client.dry_run:
            path, body = self.body(prompt, n, seed * 1_000_003)
            (answer,) = self.client.post_many(path, [body], check=lambda a: unreadable(a, 1))
            self.takes_n = len(response_texts(answer)) >= n
            if not self.takes_n:
                log.warning("the server at %s answered %d choice(s) where n=%d were asked (it ignores n): each "
                            "prompt's samples are sent as separate requests, each with its own seed",
                            self.client.settings.base_url, len(response_texts(answer)), n)
        return self.takes_n is not False

    def answer(self, requests: list[tuple[str, dict]], n: int, desc: str) -> list[list[str]]:
        """The ``n`` response texts of each (path, body), cut at the stop strings."""
        s = self.settings
        answers: list = [None] * len(requests)
        for path in {p for p, _ in requests}:  # completions and chat prompts never mix in practice
            idx = [i for i, (p, _) in enumerate(requests) if p == path]
            check = lambda answer: unreadable(answer, n)  # noqa: E731
            for i, a in zip(idx, self.client.post_many(path, [requests[i][1] for i in idx], desc, check=check)):
                answers[i] = a
        texts = []
        for answer in answers:
            if answer is None:  # dry run
                text = stand_in_response(min(s.max_new_tokens, self.client.output_tokens))
                texts.append([cut_at_stop(text, s.stop, s.stop_after)] * n)
                continue
            texts.append([cut_at_stop(t or "", s.stop, s.stop_after) for t in response_texts(answer)][:n])
        return texts


def response_texts(answer: dict) -> list[str | None]:
    """The texts of an answer's choices, in their order (a chat message's content, or a completion's text)."""
    choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
    return [(c.get("message") or {}).get("content") if "message" in c else c.get("text") for c in choices]


def unreadable(answer: dict, n: int) -> str | None:
    """What keeps a generation answer from being read (it is then neither used nor cached), or None."""
    try:
        texts = response_texts(answer)
    except (KeyError, TypeError, AttributeError) as err:
        return f"the server answered choices in a form this client cannot read ({type(err).__name__}: {err})"
    if not all(t is None or isinstance(t, str) for t in texts):
        return "the server answered choices whose text is not text"
    if len(texts) < n:
        return (f"the server answered {len(texts)} choices where n={n} were asked; it may not support n: use "
                "temperature=0 or num_repeats=1")
    return None
