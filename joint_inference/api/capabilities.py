"""What an OpenAI-compatible server can do, asked once and kept beside its answers.

Servers that all call themselves OpenAI-compatible differ where classification depends on them: llama.cpp's
server takes text prompts only, returns any number of alternatives and scores prompts with ``echo``; vLLM takes
token ids and caps alternatives at its ``--max-logprobs``; OpenAI's chat endpoint returns 20 and has no echo.
Guessing wrong fails (HTTP 500 on token ids) or, worse, scores silently wrong (labels outside the returned
alternatives). So a run asks the server once, with a few one-token requests:

* ``GET /v1/models``: the model ids it serves (a name it does not serve is an error, not a silent default);
* a token-id prompt: whether it takes one (``prompt_format=auto`` then sends ids, else text);
* ``echo`` with ``logprobs``: whether it returns the prompt's own token log-probs, which score each label as
  the exact log-probability of its tokens after the prompt (``score_with=auto`` then uses them);
* 1,000 alternatives: how many it returns (or the cap its error names), the most a read that misses a label
  is asked again with;
* on the chat endpoint, the prompt tokens of a one-message chat, which tell whether the server applies the
  model's own chat template.

The answers are kept in ``<api.cache_dir>/capabilities.json`` under the server's URL, model and endpoint, so
a resumed run reads the same way (its requests, and so its cache keys, are those of the first run) and a run
whose answers are all cached needs no server at all.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.utils import atomic_write_json
from .client import ENDPOINTS, APIClient, APIError

log = logging.getLogger(__name__)
PROBE_TOP = 1000  # alternatives asked for when measuring a server's limit
FILE = "capabilities.json"


@dataclass
class Capabilities:
    """A server's answers to the probe; None where not asked."""

    base_url: str
    model: str
    endpoint: str
    models: list[str] | None = None  # what /v1/models lists (None: no such route)
    token_prompts: bool | None = None
    echo: bool | None = None  # prompt log-probs with echo
    top_logprobs: int | None = None  # the most alternatives it returns per position
    chat_prompt_tokens: int | None = None  # prompt tokens it counts for PROBE_MESSAGE
    seconds_per_request: float | None = None  # the probe's requests, one at a time

    def summary(self) -> str:
        """One line: what the run will use."""
        parts = []
        if self.token_prompts is not None:
            parts.append("token-id prompts" if self.token_prompts else "text prompts (token ids refused)")
        if self.echo is not None:
            parts.append("echo: exact label log-probs" if self.echo else "no echo: labels read from the top log-probs")
        if self.top_logprobs is not None:
            parts.append(f"up to {self.top_logprobs} alternatives")
        if self.seconds_per_request is not None:
            parts.append(f"{self.seconds_per_request * 1000:.0f} ms a request")
        return f"server {self.base_url} (model {self.model!r}, {self.endpoint}): " + ", ".join(parts)


def key(base_url: str, model: str, endpoint: str) -> str:
    return f"{base_url.rstrip('/')} {model} {endpoint}"


def cached(client: APIClient, endpoint: str) -> Capabilities | None:
    """The capabilities kept in the client's cache directory for its server, model and endpoint, or None."""
    path = _path(client)
    if path is None or not path.exists():
        return None
    try:
        entry = json.loads(path.read_text()).get(key(client.settings.base_url, client.settings.model, endpoint))
        return Capabilities(**entry) if entry else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def probe(client: APIClient, endpoint: str, prompt_ids: list[int], prompt_text: str, prompt_words: int) -> Capabilities:
    """Ask the server what it can do (see the module docstring), or read the answer kept from an earlier run.
    ``prompt_ids``/``prompt_text``: a short prompt as ids and as text, ``prompt_words`` its tokens without
    special ones (an echoing server returns log-probs for more than that). Raises a ConfigError when the server does
    not serve ``client.settings.model``."""
    found = cached(client, endpoint)
    if found is not None:
        return found
    s = client.settings
    caps = Capabilities(s.base_url, s.model, endpoint)
    listing = client.get_json("models")
    if listing is not None and isinstance(listing.get("data"), list):
        caps.models = [str(m.get("id")) for m in listing["data"] if isinstance(m, dict)]
        if caps.models and s.model not in caps.models:
            raise APIError(f"the server at {s.base_url} serves {caps.models}, not model.name={s.model!r}; set "
                           f"model.name to the id it serves (e.g. model.name={caps.models[0]!r})")
    timings: list[float] = []

    def ask(path: str, body: dict) -> dict | str:
        """The answer, or the refusal's message when the server lacks the feature."""
        start = time.perf_counter()
        try:
            answer = client.post_once(path, body)
        except APIError as err:
            if err.server_text is None or err.status in (401, 403, 404):  # gone, a key, a wrong address
                raise
            return err.server_text
        timings.append(time.perf_counter() - start)
        return answer

    if endpoint == "completions":
        one = {"max_tokens": 1, "temperature": 0}
        caps.token_prompts = isinstance(ask("completions", {"prompt": list(prompt_ids), **one}), dict)
        prompt = list(prompt_ids) if caps.token_prompts else prompt_text
        answer = ask("completions", {"prompt": prompt, **one, "echo": True, "logprobs": 1})
        caps.echo = isinstance(answer, dict) and len(prompt_logprobs(answer)) > prompt_words
        caps.top_logprobs = top_limit(ask("completions", {"prompt": prompt, **one, "logprobs": PROBE_TOP}), chat=False)
    else:
        answer = ask(ENDPOINTS["chat"], {"messages": PROBE_MESSAGE, "max_tokens": 1, "temperature": 0,
                                         "logprobs": True, "top_logprobs": 20})
        if isinstance(answer, dict):
            caps.chat_prompt_tokens = int((answer.get("usage") or {}).get("prompt_tokens") or 0) or None
            caps.top_logprobs = top_limit(answer, chat=True)
    caps.seconds_per_request = sum(timings) / len(timings) if timings else None
    _keep(client, caps)
    log.info("%s", caps.summary())
    return caps


PROBE_MESSAGE = [{"role": "user", "content": "Hello"}]


def prompt_logprobs(answer: dict) -> list:
    """The ``token_logprobs`` of a completion answer (echoed prompt tokens first), or []."""
    try:
        values = answer["choices"][0]["logprobs"]["token_logprobs"]
    except (KeyError, IndexError, TypeError):
        return []
    return values if isinstance(values, list) else []


def top_limit(answer: dict | str, chat: bool) -> int:
    """How many alternatives an answer holds, or the cap a refusal names ("... max allowed: 20"); 0 when it
    holds none."""
    if isinstance(answer, str):
        numbers = [int(n) for n in re.findall(r"\b(\d+)\b", answer) if 0 < int(n) < PROBE_TOP]
        return numbers[-1] if numbers else 0
    try:
        logprobs = answer["choices"][0]["logprobs"] or {}
        if chat:
            return len((logprobs.get("content") or [{}])[0].get("top_logprobs") or [])
        tops = logprobs.get("top_logprobs") or []
        return len(tops[-1] or {}) if tops else 0
    except (KeyError, IndexError, TypeError, AttributeError):
        return 0


def _path(client: APIClient) -> Path | None:
    return Path(client.settings.cache_dir) / FILE if client.settings.cache_dir else None


def _keep(client: APIClient, caps: Capabilities) -> None:
    path = _path(client)
    if path is None:
        return
    try:
        kept = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        kept = {}
    kept[key(caps.base_url, caps.model, caps.endpoint)] = asdict(caps)
    atomic_write_json(path, kept)
