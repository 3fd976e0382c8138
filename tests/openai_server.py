"""A small but real OpenAI-compatible HTTP server over a Hugging Face causal LM, for the API backend's tests
and benchmark (``transformers serve`` 5.24 ignores ``logprobs``, ``top_logprobs`` and ``echo`` on both of its
endpoints and takes text prompts only, so it cannot serve classification).

    python -m tests.openai_server --model <directory> --port 8000        # then model.base_url=http://127.0.0.1:8000/v1

Endpoints (JSON over HTTP/1.1 with keep-alive, one thread per connection, the model run one request at a time):

* ``POST /v1/completions``: ``prompt`` as text (tokenized with the model's special tokens, as vLLM does) or
  token ids; ``max_tokens``, ``temperature`` (0: greedy), ``top_p``, ``seed``, ``n``, ``stop`` (cut before it),
  ``logprobs`` (top-k of every generated token, the legacy layout), ``echo``, and vLLM's
  ``return_tokens_as_token_ids``.
* ``POST /v1/chat/completions``: ``messages`` with text and ``image_url`` parts (data URLs are decoded as images,
  which this text model reads as the word "<image>"), the model's chat template or a plain "role: text" one;
  ``logprobs`` + ``top_logprobs`` in the chat layout.
* ``GET /v1/models``.

Log-probs are the model's raw next-token log-softmax, as vLLM's default; a token is written as the text it adds
after the previous token (OpenAI's and vLLM's way), or ``token_id:<id>``. Knobs for tests: ``fail_first``
(statuses for the first requests), ``logprobs=False`` (ignore log-prob fields, as ``transformers serve`` does),
``max_logprobs`` (vLLM's cap, an error above it), ``stop_after`` (stop serving after that many answers),
``api_key`` (require it), ``chat_responder`` (a function of the messages that writes the chat answers),
``unsupported`` (features answered with llama.cpp's server's HTTP 500: ``token_ids`` prompts, ``logprobs``; ``n``,
which it ignores: one choice; ``echo``, answered without the prompt's log-probs). ``echo`` with ``logprobs``
returns the prompt's token log-probs first, as llama.cpp's server does (a leading BOS left out, the first null,
character offsets into the echoed text).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class OpenAICompatibleServer:
    def __init__(self, model_dir=None, *, model=None, tokenizer=None, host: str = "127.0.0.1", port: int = 0,
                 name: str = "tiny", fail_first: list[int] | None = None, logprobs: bool = True,
                 max_logprobs: int = 20, stop_after: int | None = None, api_key: str | None = None,
                 chat_responder=None, delay_s: float = 0.0, unsupported: tuple[str, ...] = ()):
        if model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.fail_first, self.logprobs, self.max_logprobs = list(fail_first or []), logprobs, max_logprobs
        self.stop_after, self.api_key, self.chat_responder, self.delay_s = stop_after, api_key, chat_responder, delay_s
        self.unsupported = unsupported
        self.requests: list[dict] = []  # every POST: path, body, authorization header, status
        self.answered = 0
        self.stopped = threading.Event()
        self._model_lock, self._count_lock = threading.Lock(), threading.Lock()
        self.host, self.port = host, port
        self.httpd = None
        self.thread = None

    # ------------------------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> OpenAICompatibleServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def setup(self):
                super().setup()  # headers and body leave in separate writes: without this, Nagle's algorithm and
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # delayed ACKs add ~40 ms each

            def do_GET(self):
                if server.stopped.is_set():
                    self.close_connection = True
                    return
                if self.path.rstrip("/") == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})
                self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                if server.stopped.is_set():  # a stopped server closes its kept-alive connections without answering
                    self.close_connection = True
                    return
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    return self._send(400, {"error": {"message": "body is not JSON"}})
                try:
                    status, answer, headers = server.handle(self.path, body, self.headers.get("Authorization"))
                except Exception as err:  # a bug or a bad request the checks missed: an HTTP 500, as servers do
                    status, answer, headers = 500, {"error": {"message": f"{type(err).__name__}: {err}"}}, {}
                if status is None:  # stopped meanwhile: the connection closes without an answer
                    self.close_connection = True
                    return
                self._send(status, answer, headers)

            def _send(self, status, answer, headers=None):
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.stopped.clear()
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop answering: the listening socket closes (connections are refused), kept-alive ones are dropped."""
        self.stopped.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -------------------------------------------------------------------------------------- requests
    def handle(self, path: str, body: dict, authorization: str | None) -> tuple[int, dict, dict]:
        record = {"path": path, "body": body, "authorization": authorization}
        with self._count_lock:
            self.requests.append(record)
            failing = self.fail_first.pop(0) if self.fail_first else None
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            record["status"] = 401
            return 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}, {}
        problem = self.unsupported_feature(body)
        if problem:  # as llama.cpp's server answers a feature it lacks: a server error, the same every time
            record["status"] = 500
            return 500, {"error": {"code": 500, "message": problem, "type": "server_error"}}, {}
        if failing is not None:
            record["status"] = failing
            return failing, {"error": {"message": f"injected {failing}"}}, {"Retry-After": "0"} if failing == 429 else {}
        try:
            if path.rstrip("/") == "/v1/completions":
                answer = self.completions(body)
            elif path.rstrip("/") == "/v1/chat/completions":
                answer = self.chat(body)
            else:
                record["status"] = 404
                return 404, {"error": {"message": f"no route {path}"}}, {}
        except ValueError as err:
            record["status"] = 400
            return 400, {"error": {"message": str(err), "type": "BadRequestError"}}, {}
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._count_lock:
            if self.stop_after is not None and self.answered >= self.stop_after:
                record["status"] = None  # computed while the last answer went out: dropped, never answered
                return None, None, None
            self.answered += 1
            stop = self.stop_after is not None and self.answered >= self.stop_after
        record["status"] = 200
        if stop:
            self.stopped.set()
            threading.Thread(target=self.stop, daemon=True).start()
        return 200, answer, {}

    def unsupported_feature(self, body: dict) -> str | None:
        prompt = body.get("prompt")
        if "token_ids" in self.unsupported and isinstance(prompt, list):
            return "Input should be a valid string"
        if "logprobs" in self.unsupported and body.get("logprobs"):
            return "logprobs is not supported by this server (start it with logprobs support)"
        return None

    def _top_k(self, body: dict, chat: bool) -> int:
        if not self.logprobs:
            return 0
        if chat:
            k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        else:
            k = int(body.get("logprobs") or 0)
        if k > self.max_logprobs:
            raise ValueError(f"Requested sample logprobs of {k}, which is greater than max allowed: {self.max_logprobs}")
        return k

    def completions(self, body: dict) -> dict:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        k = self._top_k(body, chat=False)
        outs = self.generate(ids, body, k)
        echo = body.get("echo") and "echo" not in self.unsupported
        shown = (prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=True)) if echo else ""
        choices = []
        for i, (text, tokens, tops, finish) in enumerate(outs):
            logprobs = None
            if k or (self.logprobs and body.get("logprobs") == 0):
                logprobs = {"tokens": [t for t, _ in tokens], "token_logprobs": [lp for _, lp in tokens],
                            "top_logprobs": [dict(top) for top in tops],
                            "text_offset": [sum(len(t) for t, _ in tokens[:j]) for j in range(len(tokens))]}
                if echo:  # the prompt's own tokens first, as llama.cpp's server gives them
                    logprobs = self.echoed(ids, k, shown, logprobs)
            choices.append({"index": i, "text": shown + text, "logprobs": logprobs, "finish_reason": finish})
        return {"id": f"cmpl-{len(self.requests)}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model"), "choices": choices, "usage": self._usage(ids, outs)}

    @torch.no_grad()
    def echoed(self, ids: list[int], k: int, shown: str, generated: dict) -> dict:
        """Log-probs of the prompt's tokens (less a leading BOS; the first is null, as OpenAI's API had it) before
        those of the generated ones, with character offsets into the echoed text."""
        bos = self.tokenizer.bos_token_id
        start = 1 if ids and ids[0] == bos else 0
        with self._model_lock:
            logprobs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)
        tokens, values, tops, offsets = [], [], [], []
        for j in range(start, len(ids)):
            tokens.append(self.token_text(ids[j - 1] if j else None, ids[j], False))
            offsets.append(len(self.tokenizer.decode(ids[start:j])))
            if j == start:
                values.append(None)
                tops.append(None)
                continue
            values.append(float(logprobs[j - 1, ids[j]]))
            v, i = torch.topk(logprobs[j - 1], min(k, logprobs.shape[-1])) if k else (torch.empty(0), torch.empty(0))
            tops.append({self.token_text(ids[j - 1], int(t), False): float(x) for x, t in zip(v.tolist(), i.tolist())})
        return {"tokens": tokens + generated["tokens"], "token_logprobs": values + generated["token_logprobs"],
                "top_logprobs": tops + generated["top_logprobs"],
                "text_offset": offsets + [len(shown) + o for o in generated["text_offset"]]}

    def chat(self, body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        flat = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "text":
                        parts.append(part["text"])
                    elif part.get("type") == "image_url":
                        decode_image(part["image_url"]["url"])  # a broken image is a 400, as servers do
                        parts.append("<image>")
                    else:
                        raise ValueError(f"unknown content part {part.get('type')!r}")
                content = " ".join(parts)
            flat.append({"role": m["role"], "content": content})
        if self.chat_responder is not None:
            text = self.chat_responder(messages)
            return {"id": f"chat-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model"), "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": "stop"}]}
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True)
        else:
            ids = self.tokenizer("".join(f"{m['role']}: {m['content']}\n" for m in flat) + "assistant:")["input_ids"]
        k = self._top_k(body, chat=True)
        outs = self.generate(ids, body, k)
        choices = []
        for i, (text, tokens, tops, finish) in enumerate(outs):
            logprobs = None
            if self.logprobs and body.get("logprobs"):
                logprobs = {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                         "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())}
                                                          for a, b in top]} for (t, lp), top in zip(tokens, tops)]}
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": finish})
        return {"id": f"chat-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model"), "choices": choices, "usage": self._usage(ids, outs)}

    @staticmethod
    def _usage(ids, outs) -> dict:
        completion = sum(len(tokens) for _, tokens, _, _ in outs)
        return {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion}

    # ----------------------------------------------------------------------------------- the model
    def token_text(self, previous: int | None, token: int, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token}"
        if previous is None:
            return self.tokenizer.decode([token])
        before = self.tokenizer.decode([previous])
        both = self.tokenizer.decode([previous, token])
        return both[len(before):] if both.startswith(before) else self.tokenizer.decode([token])

    @torch.no_grad()
    def generate(self, ids: list[int], body: dict, k: int) -> list[tuple[str, list, list, str]]:
        """(text, [(token, log-prob)], [top-k pairs per token], finish reason) for each of the ``n`` choices."""
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        n = 1 if "n" in self.unsupported else int(body.get("n") or 1)  # llama.cpp's server: one choice, n ignored
        copies, n = (n, 1) if temperature == 0 else (1, n)  # greedy: one sequence, repeated
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        eos = self.tokenizer.eos_token_id
        with self._model_lock:
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            kwargs = {"do_sample": False} if temperature == 0 else {
                "do_sample": True, "temperature": temperature, "top_p": float(body.get("top_p") or 1.0), "top_k": 0}
            out = self.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=max_tokens,
                num_return_sequences=n, output_logits=True, return_dict_in_generate=True,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
                stop_strings=stop or None, tokenizer=self.tokenizer if stop else None, **kwargs)
        results = []
        for row in range(n):
            new = out.sequences[row, len(ids):].tolist()
            if eos in new:  # generation ended at EOS; padding follows
                new = new[:new.index(eos)]
                finish = "stop"
            else:
                finish = "length" if len(new) >= max_tokens else "stop"
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            tokens, tops, previous = [], [], ids[-1] if ids else None
            for step, token in enumerate(new):
                logprobs = torch.log_softmax(out.logits[step][row].float(), dim=-1)
                tokens.append((self.token_text(previous, token, as_ids), float(logprobs[token])))
                if k:
                    values, indices = torch.topk(logprobs, min(k, logprobs.numel()))
                    tops.append([(self.token_text(previous, int(i), as_ids), float(v))
                                 for v, i in zip(values.tolist(), indices.tolist())])
                else:
                    tops.append([])
                previous = token
            results.append((text, tokens, tops, finish))
        return results * copies


def decode_image(url: str):
    from PIL import Image

    if not url.startswith("data:image/") or ";base64," not in url:
        raise ValueError("image_url must be a base64 data URL")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(";base64,", 1)[1])))
    image.load()
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local model directory (weights and tokenizer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default="tiny", help="the model id it answers to")
    parser.add_argument("--max-logprobs", type=int, default=20)
    args = parser.parse_args()
    server = OpenAICompatibleServer(args.model, host=args.host, port=args.port, name=args.name,
                                    max_logprobs=args.max_logprobs).start()
    print(f"serving {args.model} at {server.url}", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
