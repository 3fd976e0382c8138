"""Requests to an OpenAI-compatible server: bounded concurrency, retries, a progress bar, a disk cache.

    client = APIClient(client_settings(model, api, output_dir, progress))   # model.base_url / name, api.*
    answers = client.post_many("completions", bodies, desc="zero-shot [test]")

* **Key**: read from the environment variable ``model.api_key_env`` (default ``OPENAI_API_KEY``) and sent as
  ``Authorization: Bearer ...``; never logged, never written to results, caches or config dumps (it is not a
  config key), and blanked out of any server message quoted in an error. A local server may need none.
* **Retries**: a 429, a 5xx, a timeout or a lost connection is tried again up to ``api.max_retries`` times,
  waiting ``api.backoff_s * 2**attempt`` seconds (at most ``api.max_backoff_s``, at least the server's
  ``Retry-After``, with up to 50% random jitter). Other 4xx answers fail at once with the server's message.
* **Concurrency**: ``api.concurrency`` requests in flight (threads sharing one connection pool).
* **Cache**: each answer is written to ``api.cache_dir`` (default ``<run dir>/api_cache``) as it arrives,
  keyed by the URL and the request body, so a run stopped by an error or Ctrl-C resumes without paying again;
  identical requests in one batch are sent once.
* **Usage**: requests sent, cache hits, retries and the server's token counts accumulate in
  ``<run dir>/api_usage.json`` (with the cost when ``model.price_per_million_*`` are set).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..core.errors import ConfigError
from ..core.utils import atomic_write_json, check_writable_dir
from .cache import RequestCache, request_key

log = logging.getLogger(__name__)
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
ENDPOINTS = {"completions": "completions", "chat": "chat/completions"}  # model.endpoint -> path after base_url
INSTALL = "pip install -r requirements_api.txt (or pip install 'joint-inference[api]')"


Check = Callable[[dict], str | None]  # what keeps a server's answer from being read, or None


class APIError(ConfigError):
    """The server could not give an answer (gone, refusing, out of retries). A :class:`ConfigError`, so the
    entry scripts print it as one ``error: ...`` line and exit with code 2. A refusal keeps the HTTP ``status``
    and the ``server_text``."""

    status: int | None = None
    server_text: str | None = None


@dataclass(frozen=True)
class ClientSettings:
    base_url: str
    model: str
    api_key_env: str = DEFAULT_KEY_ENV
    concurrency: int = 8
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    cache_dir: str | None = None
    usage_path: str | None = None
    price_in: float | None = None  # dollars per million prompt tokens
    price_out: float | None = None  # dollars per million completion tokens
    extra_body: dict = field(default_factory=dict)  # server-specific request fields, merged into every body
    show_progress: bool = True

    def __post_init__(self):
        if self.concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ConfigError("api.concurrency must be >= 1, api.max_retries >= 0, api.timeout_s > 0, api.backoff_s >= 0")

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + "/" + path.lstrip("/")


def client_settings(m, a, output_dir: str, progress: bool) -> ClientSettings:
    """A run's client settings: the server and model from its model's settings ``m`` (``APIModelSettings``), the
    transport from its ``api`` settings ``a``, the cache and usage files in ``output_dir``."""
    base_url = m.base_url or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        raise ConfigError("backend=openai needs the server's address: model.base_url=http://<host>:<port>/v1 "
                          "(model=openai_compatible has the key; or set $OPENAI_BASE_URL)")
    if not str(base_url).startswith(("http://", "https://")):
        raise ConfigError(f"model.base_url must start with http:// or https://, got {base_url!r}")
    out_dir = Path(output_dir)
    return ClientSettings(
        base_url=str(base_url), model=str(m.name), api_key_env=m.api_key_env, concurrency=a.concurrency,
        timeout_s=float(a.timeout_s), max_retries=a.max_retries, backoff_s=float(a.backoff_s),
        max_backoff_s=float(a.max_backoff_s), cache_dir=a.cache_dir or str(out_dir / "api_cache"),
        usage_path=str(out_dir / "api_usage.json"), price_in=m.price_per_million_input_tokens,
        price_out=m.price_per_million_output_tokens, extra_body=dict(m.extra_body or {}), show_progress=progress)


def cost(prompt_tokens: float, completion_tokens: float, price_in: float | None, price_out: float | None):
    """Dollars for the tokens at the model's prices, or None when a price is not set."""
    if price_in is None or price_out is None:
        return None
    return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6


def estimate_prompt_tokens(body: dict, count_text: Callable[[str], int] | None = None,
                           tokens_per_image: int = 85) -> int:
    """Prompt tokens of a request: exact for token-id prompts, else ``count_text`` (a tokenizer) or ~4
    characters a token; chat messages add 4 tokens each and ``tokens_per_image`` per image (85: GPT-4o's
    ``detail: low``)."""
    count = count_text or (lambda text: math.ceil(len(text) / 4))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, str):
        return count(prompt)
    total = 3
    for message in body.get("messages", []):
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        total += 4 + sum(count(p.get("text", "")) if p.get("type") == "text" else tokens_per_image for p in parts)
    return total


@dataclass
class Usage:
    """What a client did, cumulative over the runs that used the same usage file."""

    requests_sent: int = 0  # answered by the server (retries not counted)
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0  # the server's own counts (``usage``) of the answers it sent
    completion_tokens: int = 0
    seconds: float = 0.0  # wall time of the batches, retry waits included
    busy_seconds: float = 0.0  # wall time with at least one request on the wire (retry waits excluded)

    def as_dict(self, price_in=None, price_out=None) -> dict:
        out = dict(self.__dict__)
        # the server's rate: requests answered per second of requests in flight, so backoff waits do not count
        out["requests_per_second"] = self.requests_sent / self.busy_seconds if self.busy_seconds else None
        out["cost_usd"] = cost(self.prompt_tokens, self.completion_tokens, price_in, price_out)
        return out


class APIClient:
    """POSTs JSON bodies to ``<base_url>/<path>`` with the behaviour described in the module docstring."""

    dry_run = False

    def __init__(self, settings: ClientSettings):
        try:
            import httpx
        except ModuleNotFoundError:
            raise ConfigError(f"backend=openai needs httpx, which is not installed: {INSTALL}") from None
        self.settings = settings
        # a key file saved on Windows ends in "\r\n": the whitespace around a key is not part of it
        self._key = (os.environ.get(settings.api_key_env) or "").strip() or None
        if self._key and not (self._key.isascii() and self._key.isprintable() and " " not in self._key):
            raise ConfigError(f"${settings.api_key_env} holds characters that no key has (not ASCII, or spaces or "
                              "control characters inside it); set it to the key alone")
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(settings.timeout_s, connect=min(10.0, settings.timeout_s)),
                                  # the threads bound the requests in flight; a pool of exactly one connection
                                  # made httpx 0.28 wait ~0.3 s per request, so it has room to spare
                                  limits=httpx.Limits(max_connections=2 * settings.concurrency + 8,
                                                      max_keepalive_connections=2 * settings.concurrency + 8))
        self._httpx = httpx
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request would bury the run's log
        if settings.cache_dir:  # answers paid for must have somewhere to go
            check_writable_dir(settings.cache_dir, "api.cache_dir")
        self.cache = RequestCache(settings.cache_dir) if settings.cache_dir else None
        self.usage = Usage()
        self._saved = Usage()  # what the usage file held before this client
        if settings.usage_path and Path(settings.usage_path).exists():
            try:
                saved = json.loads(Path(settings.usage_path).read_text())
                self._saved = Usage(**{k: saved[k] for k in Usage().__dict__ if k in saved})
            except (OSError, ValueError, TypeError):
                pass
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._in_flight, self._busy_since = 0, 0.0

    # --------------------------------------------------------------------------------------- public
    def close(self) -> None:
        self._http.close()

    def get_json(self, path: str) -> dict | None:
        """The JSON of ``GET <base_url>/<path>`` (e.g. ``models``), or None where the server has no such route or
        answers something else; a server that cannot be reached is an :class:`APIError`."""
        url = self.settings.url(path)
        try:
            response = self._http.get(url)
        except self._httpx.TransportError as err:
            raise APIError(f"no answer from {url} ({type(err).__name__}: {err}). Check that the server runs and "
                           "model.base_url points at it") from None
        if response.status_code in (401, 403):
            raise self._refused(url, {}, response)
        try:
            answer = response.json() if response.status_code == 200 else None
        except ValueError:
            return None
        return answer if isinstance(answer, dict) else None

    def post_once(self, path: str, body: dict) -> dict:
        """The answer to one body, sent now (retried as any request, never cached): the capability probe's
        requests. A refusal is an :class:`APIError` saying why."""
        self._stop.clear()
        start = time.perf_counter()
        try:
            return self._post(self.settings.url(path), self.body(body), key=None)
        finally:
            self.usage.seconds += time.perf_counter() - start
            self._write_usage()

    def body(self, fields: dict) -> dict:
        """A request body: ``model``, the caller's fields, then ``model.extra_body``."""
        return {"model": self.settings.model, **fields, **self.settings.extra_body}

    def post_many(self, path: str, bodies: list[dict], desc: str | None = None,
                  prompt_tokens: list[int] | None = None, check: Check | None = None) -> list[dict]:
        """The server's JSON answer to each body, in order: from the cache, else sent (``api.concurrency`` at
        a time, identical bodies once). Raises :class:`APIError` when one cannot be had; the answers that
        arrived before are cached. ``check(answer)``: what keeps an answer from being read, or None; such an
        answer is an error and is never cached (a cached one is asked for again), so a rerun asks the server
        again. ``prompt_tokens`` (exact counts) only feed a dry run's tally."""
        url = self.settings.url(path)
        keys = [request_key(url, b) for b in bodies]
        results: list[dict | None] = [None] * len(bodies)
        todo: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key in todo:
                todo[key].append(i)
                continue
            hit = self.cache.get(key) if self.cache else None
            if hit is not None and check is not None and (problem := check(hit)) is not None:
                log.warning("a cached answer of %s cannot be read (%s); asking again", url, problem)
                hit = None
            if hit is not None:
                results[i] = hit
                self.usage.cache_hits += 1
            else:
                todo[key] = [i]
        progress = tqdm(total=len(bodies), initial=len(bodies) - sum(map(len, todo.values())), desc=desc,
                        disable=not self.settings.show_progress or desc is None, leave=False, unit="req")
        try:
            if todo:
                self._send_all(url, [(key, bodies[idx[0]], idx) for key, idx in todo.items()], results, progress,
                               check)
        finally:
            progress.close()
            self._write_usage()
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------------------------- internals
    def _send_all(self, url, jobs, results, progress, check: Check | None) -> None:
        self._stop.clear()
        start = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=min(self.settings.concurrency, len(jobs)))
        futures = {pool.submit(self._post, url, body, key, check): idx for key, body, idx in jobs}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    answer = fut.result()  # raises the first failure
                    for i in futures[fut]:
                        results[i] = answer
                    progress.update(len(futures[fut]))
        except BaseException as err:
            self._stop.set()  # the threads still sending give up before their next try
            pool.shutdown(wait=False, cancel_futures=True)
            if not isinstance(err, KeyboardInterrupt):  # answers on their way are still cached (bounded wait)
                wait([f for f in futures if not f.cancelled()], timeout=min(10.0, self.settings.timeout_s))
            raise
        finally:
            self.usage.seconds += time.perf_counter() - start
        pool.shutdown(wait=True)

    def _on_wire(self, step: int) -> None:
        """Count requests in flight; the time with at least one is the usage's ``busy_seconds``."""
        with self._lock:
            now = time.perf_counter()
            if step > 0 and self._in_flight == 0:
                self._busy_since = now
            self._in_flight += step
            if step < 0 and self._in_flight == 0:
                self.usage.busy_seconds += now - self._busy_since

    def _post(self, url: str, body: dict, key: str | None, check: Check | None = None) -> dict:
        httpx, s = self._httpx, self.settings
        last = ""
        for attempt in range(s.max_retries + 1):
            if self._stop.is_set():
                raise APIError("stopped: another request of the batch failed")
            retry_after = 0.0
            try:
                self._on_wire(+1)
                try:
                    response = self._http.post(url, json=body)
                finally:
                    self._on_wire(-1)
            except httpx.TransportError as err:  # connection refused or lost, timeouts
                last = f"{type(err).__name__}: {err}"
            else:
                if response.status_code == 200:
                    try:
                        answer = response.json()
                    except ValueError:
                        raise APIError(f"{url} answered 200 with a body that is not JSON: "
                                       f"{self._redact(response.text[:300])!r}") from None
                    if not isinstance(answer, dict) or not answer.get("choices"):
                        raise APIError(f"{url} answered without choices: {self._redact(json.dumps(answer)[:300])}")
                    self._record(answer)  # paid for, read or not
                    problem = check(answer) if check else None
                    if problem is not None:
                        raise APIError(f"{self._redact(problem)} (the answer was not cached: the same command asks "
                                       "the server again)")
                    if self.cache and key is not None:
                        self.cache.put(key, url, body.get("model"), answer)
                    return answer
                if response.status_code != 429 and response.status_code < 500 or unsupported(response.text):
                    raise self._refused(url, body, response)  # the same answer every time: no retry
                last = f"HTTP {response.status_code}: {self._redact(response.text[:300])}"
                retry_after = _seconds(response.headers.get("retry-after"))
            if attempt == s.max_retries:
                break
            with self._lock:
                self.usage.retries += 1
            delay = min(s.max_backoff_s, s.backoff_s * 2 ** attempt) * (0.5 + 0.5 * random.random())
            delay = max(delay, min(retry_after, s.max_backoff_s))
            log.debug("retrying %s in %.2f s after %s", url, delay, last)
            if self._stop.wait(delay):
                raise APIError("stopped: another request of the batch failed")
        cached = f"; the answers received so far are cached in {self.cache.root}" if self.cache else ""
        raise APIError(f"no answer from {url} after {s.max_retries + 1} tries (last: {last}){cached}. Check that the "
                       "server runs and model.base_url points at it, then start the same command again: it resumes "
                       "without sending the cached requests again (api.max_retries / api.timeout_s / "
                       "api.concurrency tune the patience with a slow or rate-limited server)")

    def _refused(self, url: str, body: dict, response) -> APIError:
        """The error for an answer that a retry cannot change; it keeps the status and the server's text."""
        err = self._refusal(url, body, response)
        err.status, err.server_text = response.status_code, self._redact(response.text[:500])
        return err

    def _refusal(self, url: str, body: dict, response) -> APIError:
        status, text = response.status_code, self._redact(response.text[:500])
        if status in (401, 403):
            where = (f"the key in ${self.settings.api_key_env}" if self._key
                     else f"no key (${self.settings.api_key_env} is not set)")
            return APIError(f"{url} refused the request with HTTP {status} ({text}); it was sent with {where}. "
                            f"Set ${self.settings.api_key_env} to a valid key (model.api_key_env names another variable)")
        if status == 404:
            return APIError(f"{url} answered HTTP 404 ({text}): no such endpoint or model {body.get('model')!r} there. "
                            "Check model.base_url (usually ends in /v1), model.name and model.endpoint")
        if "valid string" in text.lower() and isinstance(body.get("prompt"), list):
            return APIError(f"{url} takes text prompts only: it refused the prompt as token ids (HTTP {status}: {text}). "
                            "Set model.prompt_format=text (llama.cpp's server and others that tokenize themselves), "
                            "which sends each prompt's text")
        asked = [k for k in ("logprobs", "top_logprobs", "echo") if k in body]
        if asked and any(word in text.lower() for word in ("logprob", "echo")):
            return APIError(f"{url} refused the log-probs request ({', '.join(f'{k}={body[k]}' for k in asked)}): "
                            f"HTTP {status} {text}. Set model.max_top_logprobs to what the server allows (OpenAI "
                            "chat: 20, OpenAI completions: 5, vLLM: its --max-logprobs), model.endpoint=chat if only "
                            "the chat endpoint has log-probs, or use backend=hf / backend=vllm")
        if unsupported(text):
            return APIError(f"{url} says a feature this request uses is not supported (HTTP {status}: {text}). This is "
                            "not retried: enable the feature where the server is started, or use backend=hf / "
                            "backend=vllm")
        return APIError(f"{url} refused the request with HTTP {status}: {text}")

    def _record(self, answer: dict) -> None:
        usage = answer.get("usage") or {}
        with self._lock:
            self.usage.requests_sent += 1
            self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _write_usage(self) -> None:
        if not self.settings.usage_path:
            return
        total = Usage(**{k: getattr(self._saved, k) + getattr(self.usage, k) for k in Usage().__dict__})
        atomic_write_json(self.settings.usage_path, {
            "server": self.settings.base_url, "model": self.settings.model,
            **total.as_dict(self.settings.price_in, self.settings.price_out)})


def unsupported(text: str) -> bool:
    """Whether an error's body says the server lacks a feature (llama.cpp's server answers HTTP 500 then): an answer
    that a retry cannot change."""
    text = text.lower()
    return any(words in text for words in ("not supported", "unsupported", "not implemented", "should be a valid string"))


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except ValueError:
        return 0.0


# ------------------------------------------------------------------------------------------ dry run
@dataclass
class DryRunTally:
    """What a run would send: requests not in the cache, their prompt tokens, output tokens estimated."""

    requests: int = 0
    cached: int = 0
    duplicates: int = 0  # the same request again in one batch: sent once
    prompt_tokens: int = 0
    output_tokens: int = 0  # the estimate: classification 1 a request, generation api.dry_run_output_tokens
    max_output_tokens: int = 0  # the bound: max_tokens x n of every request
    unprobed: int = 0  # scorers that counted top-log-prob reads for a server never probed (see the summary)

    def add(self, other: DryRunTally) -> None:
        for k in self.__dict__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


class DryRunClient(APIClient):
    """Counts what :class:`APIClient` would send and answers it with ``None`` (callers put a stand-in answer in
    its place), or with the cached answer where there is one; needs no server and no key."""

    dry_run = True

    def __init__(self, settings: ClientSettings, tally: DryRunTally, output_tokens: int,
                 count_text: Callable[[str], int] | None = None, tokens_per_image: int = 85):
        self.settings, self.tally, self.output_tokens = settings, tally, output_tokens
        self.count_text, self.tokens_per_image = count_text, tokens_per_image
        self.cache = RequestCache(settings.cache_dir) if settings.cache_dir else None
        self.usage = Usage()

    def close(self) -> None:
        pass

    def post_many(self, path, bodies, desc=None, prompt_tokens=None, check=None):
        """Cached answers where the cache has them and ``check`` reads them (the run follows them, as a rerun
        would), else ``None``."""
        url, seen, answers = self.settings.url(path), set(), [None] * len(bodies)
        for i, body in enumerate(bodies):
            key = request_key(url, body)
            hit = self.cache.get(key) if self.cache else None
            if hit is not None and check is not None and check(hit) is not None:
                hit = None  # a real run asks again
            if hit is not None:
                answers[i] = hit
            if key in seen:
                self.tally.duplicates += 1
                continue
            seen.add(key)
            if hit is not None:
                self.tally.cached += 1
                continue
            n = int(body.get("n") or 1)
            self.tally.requests += 1
            self.tally.prompt_tokens += (prompt_tokens[i] if prompt_tokens is not None else
                                         estimate_prompt_tokens(body, self.count_text, self.tokens_per_image))
            most = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0) * n
            self.tally.max_output_tokens += most
            self.tally.output_tokens += min(most, self.output_tokens * n) if most > n else most
        return answers
