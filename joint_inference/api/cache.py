"""Answers of an OpenAI-compatible server kept on disk, so that an interrupted run resumes without paying twice.

One JSON file per request, ``<dir>/<key[:2]>/<key>.json``, written atomically (a temporary file renamed into
place: a reader sees a whole answer or none). There is no fsync per answer (it cost ~0.3 s a request on a busy
disk); after a power cut a damaged file reads as missing and that request is sent again. The key is the SHA-256 of the endpoint's URL and the request body (model, prompt or messages, sampling
settings); the API key is never part of it and never written.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..core.errors import ConfigError
from ..core.utils import WriteError, atomic_write_text


def request_key(url: str, body: dict) -> str:
    """SHA-256 of the URL and the body, canonical JSON (sorted keys): the same request gives the same key."""
    text = json.dumps({"url": url, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class RequestCache:
    """``get(key)`` / ``put(key, response)`` of JSON answers under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self.path(key)
        try:
            return json.loads(path.read_text())["response"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):  # unreadable: ask again, the new answer replaces it
            return None

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def put(self, key: str, url: str, model: str | None, response: dict) -> None:
        try:  # not durable: an fsync per answer cost ~0.3 s a request on a busy disk (see above)
            atomic_write_text(self.path(key), json.dumps({"url": url, "model": model, "response": response}) + "\n",
                              durable=False)
        except WriteError as err:
            raise ConfigError(f"could not keep an answer in the cache {self.root} ({err.reason}); the answers kept "
                              "before stay there. Free some space or make it writable (or choose another "
                              "api.cache_dir), then start the same command again") from None
