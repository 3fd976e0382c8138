"""backend=openai against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/openai_server.py: the tiny
random model behind /v1/completions and /v1/chat/completions, started in a thread by each test).

UICL through the API predicts what backend=hf predicts; label tokens outside the server's top-k get the
documented floor; 429/5xx are retried; a second run is answered from the cache; the key is sent but never
written; bad set-ups are ConfigErrors; a server that stops mid-run gives a clear error and the rerun resumes
from the cache; GSM8K generation equals backend=hf's; MMMU prompts, parsing and rounds on rows in the hub's
schema; dry_run counts without sending.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("httpx")

from joint_inference.api.client import APIClient, APIError, ClientSettings
from joint_inference.core.errors import ConfigError
from joint_inference.methods.mmmu import (
    MC,
    OPEN,
    MMMUFormat,
    open_correct,
    original_reading,
    question_row,
    read_choice,
    read_open,
)
from joint_inference.prompts.templates import PromptEncoder, Template
from joint_inference.scoring.api import APIScorer
from joint_inference.scoring.api_generators import APIGenerator
from joint_inference.scoring.generators import SamplingSettings
from joint_inference.scoring.scorer import Scorer
from tests.conftest import REPO, compose, one_torch_thread, settings_of, write_jsonl
from tests.openai_server import OpenAICompatibleServer
from tests.test_vllm_scoring import prompts_with_demonstrations

PRIMARY = "unsupervised_icl_llm"
TEMPLATE = Template("{sentence}\nThe sentiment of the sentence is {y}.")
KEY = "sk-test-" + "7f3a9c1e5b2d4086aa" * 2  # a made-up key that must never reach a file


def quoted(path) -> str:
    return "'" + str(path) + "'"


@pytest.fixture(autouse=True, scope="module")
def on_one_thread():
    with one_torch_thread():
        yield


@pytest.fixture()
def server(tiny_llama):
    model, tokenizer = tiny_llama
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=400) as srv:
        yield srv


def client(url: str, **kw) -> APIClient:
    return APIClient(ClientSettings(base_url=url, model="tiny", cache_dir=kw.pop("cache_dir", None),
                                    show_progress=False, backoff_s=0.01, max_backoff_s=0.05, **kw))


FULL = ["dataset.num_examples=24", "N=3", "T=2", "num_repeats=3"]  # 16 unlabelled + 8 test: 192 prompts
SMALL = ["dataset.num_examples=12", "N=2", "T=1", "num_repeats=2"]  # 8 unlabelled + 4 test: 12 + 4*2 + 12*2 = 44


def api_config(model_dir, data_root, out_dir, url, *extra, size=FULL):
    """The test_icl run (SST-2 rows of the tiny fixture, N=3, T=2, 3 votes) via the API."""
    return compose(PRIMARY, [
        "backend=openai", "model=openai_compatible", "model.name=tiny", f"model.pretrained={quoted(model_dir)}",
        f"model.base_url={url}", "model.max_top_logprobs=400", "dataset=sst2", f"dataset.data_root={quoted(data_root)}",
        *size, "device=cpu", "progress=false", "api.backoff_s=0.01", "api.max_backoff_s=0.05", "api.concurrency=4",
        f"output_dir={quoted(out_dir)}", *extra])


def hf_config(model_dir, data_root, out_dir, *extra):
    return compose(PRIMARY, [
        f"model.pretrained={quoted(model_dir)}", "model.embedded=null", "model.name=tiny", "dataset=sst2",
        f"dataset.data_root={quoted(data_root)}", "dataset.num_examples=24", "N=3", "T=2", "num_repeats=3",
        "device=cpu", "forward_batch_size=5", "progress=false", f"output_dir={quoted(out_dir)}", *extra])


def stages(out_dir: Path) -> dict:
    return json.loads((out_dir / "state.json").read_text())["stages"]


def assert_same_stages(got: Path, want: Path) -> None:
    """Every stage's predictions and votes equal; the log-probs kept for diagnostics within float error."""
    a, b = stages(got), stages(want)
    assert a.keys() == b.keys()
    for stage in a:
        assert a[stage].keys() == b[stage].keys()
        for field, values in a[stage].items():
            if np.asarray(values).dtype.kind == "f":
                np.testing.assert_allclose(values, b[stage][field], atol=1e-4)
            else:
                assert values == b[stage][field], (stage, field)


def posts(srv) -> list[dict]:
    return [r for r in srv.requests if r["path"].startswith("/v1/")]


# ------------------------------------------------------------------------------ classification
def test_uicl_through_the_api_equals_backend_hf_and_a_second_run_is_answered_from_the_cache(
        tiny_llama_dir, tiny_sst2_root, tmp_path, server):
    from joint_inference.runs.root import run_icl as run

    want = run(hf_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "hf"))
    got = run(api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "api", server.url))
    assert_same_stages(tmp_path / "api", tmp_path / "hf")  # every stage's predictions and votes
    assert got["zero_shot"] == want["zero_shot"]
    assert [{k: v for k, v in r.items() if k != "diagnostics"} for r in got["rounds"]] == \
        [{k: v for k, v in r.items() if k != "diagnostics"} for r in want["rounds"]]
    probe, sent = posts(server)[:3], posts(server)[3:]
    # the probe: token ids taken, echo answered, 1,000 alternatives refused (the server's cap is 400)
    assert [r["status"] for r in probe] == [200, 200, 400] and probe[1]["body"]["echo"] is True
    assert got["timing"]["prompts_scored"] == 24 + 8 * 3 + 2 * 24 * 3 and all(r["status"] == 200 for r in sent)
    assert len({json.dumps(r["body"], sort_keys=True) for r in sent}) == len(sent)  # never the same request twice
    body = sent[0]["body"]  # the hf backend's token ids, one greedy token, the top-k
    assert isinstance(body["prompt"], list) and body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] == 400 and body["model"] == "tiny"
    usage = json.loads((tmp_path / "api" / "api_usage.json").read_text())
    assert usage["requests_sent"] == len(sent) + 2 and usage["prompt_tokens"] > 0  # and the probe's two answered
    assert len(sent) + usage["cache_hits"] <= got["timing"]["prompts_scored"]  # a prompt seen before: the cache

    # another run directory, the same cache: not one request
    again = run(api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "again", server.url,
                           f"api.cache_dir={quoted(tmp_path / 'api' / 'api_cache')}"))
    assert len(posts(server)) == len(probe) + len(sent) and again["rounds"] == got["rounds"]
    assert json.loads((tmp_path / "again" / "api_usage.json").read_text())["cache_hits"] == 24 + 8 * 3 + 2 * 24 * 3


@pytest.mark.parametrize("endpoint,prompt_format", [("completions", "tokens"), ("completions", "text")])
def test_label_logprobs_equal_the_hf_scorer_and_the_top_k_floor(tiny_llama, tiny_llama_dir, endpoint, prompt_format):
    """With every label in the top-k the scores are the hf scorer's; with k=20 a label outside it gets the floor
    min(lowest returned log-prob, log(mass left)), so the prediction is hf's; where every label is outside, the
    scorer stops with an error that counts those reads, and guesses none."""
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, ["negative", "positive"], fold_shared_label_tokens=True)
    hf = Scorer(model, encoder, "auto", batch_size=4, show_progress=False)
    prompts, labels = prompts_with_demonstrations(encoder, 24)
    with torch.no_grad():
        want = hf.label_logprobs(prompts, labels)
        seqs = [encoder.assemble(p, lab)[0] for p, lab in zip(prompts, labels)]
        full = torch.stack([torch.log_softmax(model(torch.tensor([s])).logits[0, -1], -1) for s in seqs])
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=400) as srv:
        assert len({tuple(s) for s in seqs}) < len(seqs)  # some prompts repeat: sent once, answered for each
        exact = APIScorer(client(srv.url), encoder, "auto", endpoint=endpoint, prompt_format=prompt_format,
                          max_top_logprobs=400)
        torch.testing.assert_close(exact.label_logprobs(prompts, labels), want, atol=1e-4, rtol=1e-4)
        assert exact.mode == hf.mode == "first" and exact.floored == 0
        columns = [ids[0] for ids in encoder.label_ids]
        # k: the median rank of a prompt's best label, so that some reads hold a label and some hold none
        ranks = (full > full[:, columns].max(-1, keepdim=True).values).sum(-1)
        k = int(ranks.sort().values[len(prompts) // 2])
        seen = [any(c in torch.topk(full[row], k).indices.tolist() for c in columns) for row in range(len(prompts))]
        assert 0 < seen.count(False) < len(prompts)
        before = len(srv.requests)
        top_k = APIScorer(client(srv.url), encoder, "auto", endpoint=endpoint, prompt_format=prompt_format,
                          max_top_logprobs=k)
        with pytest.raises(ConfigError, match=rf"^{seen.count(False)} of {len(prompts)} reads had none of the label "
                                              rf"tokens \('negative', 'positive'\) among the {k} most likely"):
            top_k.label_logprobs(prompts, labels)
        assert len(srv.requests) - before == len({tuple(s) for s in seqs})
        assert all(r["body"]["logprobs"] == k for r in srv.requests[before:])
        readable = [row for row in range(len(prompts)) if seen[row]]
        got = dict(zip(readable, top_k.label_logprobs([prompts[r] for r in readable], [labels[r] for r in readable])))
    for row in readable:
        values, indices = torch.topk(full[row], k)
        inside = [c in indices.tolist() for c in columns]
        floor = min(values.min().item(), math.log(1 - values.exp().sum().item()))
        raw = [full[row, c].item() if ok else floor for c, ok in zip(columns, inside)]
        torch.testing.assert_close(got[row], torch.log_softmax(torch.tensor(raw), -1), atol=1e-4, rtol=1e-4)
        assert got[row].argmax() == want[row].argmax()
    assert top_k.floored > 0  # the random model spreads its mass: the floor is exercised


def test_tokens_as_ids_and_the_chat_endpoint(tiny_llama, server):
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, ["negative", "positive"], fold_shared_label_tokens=True)
    prompts, labels = prompts_with_demonstrations(encoder, 6)
    with torch.no_grad():
        want = Scorer(model, encoder, "first", batch_size=4, show_progress=False).label_logprobs(prompts, labels)
    by_id = APIScorer(client(server.url), encoder, "first", max_top_logprobs=400, tokens_as_ids=True)
    torch.testing.assert_close(by_id.label_logprobs(prompts, labels), want, atol=1e-4, rtol=1e-4)
    assert server.requests[-1]["body"]["return_tokens_as_token_ids"] is True
    chat = APIScorer(client(server.url), encoder, "first", endpoint="chat", max_top_logprobs=400)
    scores = chat.label_logprobs(prompts, labels)  # the server's chat template wraps the prompt: other scores
    body = server.requests[-1]["body"]
    assert body["messages"][0]["content"] in {chat.prompt_text(encoder.assemble(p, lab)[0]) for p, lab in zip(prompts, labels)}
    assert body["logprobs"] is True and body["top_logprobs"] == 400 and body["max_tokens"] == 1
    assert scores.shape == want.shape and torch.allclose(scores.exp().sum(-1), torch.ones(len(prompts)))


def test_bad_set_ups_are_config_errors(tiny_llama, tiny_llama_dir, tiny_sst2_root, tmp_path):
    model, tokenizer = tiny_llama
    url = "http://127.0.0.1:9/v1"  # never contacted
    shared = PromptEncoder(tokenizer, TEMPLATE, ["zebra crossing", "zebra stripes", "qux"], fold_shared_label_tokens=True)
    with pytest.raises(ConfigError, match=r"share their first token.*label_mode=bot_minimal"):
        APIScorer(client(url), shared, "auto")
    one_token = PromptEncoder(tokenizer, TEMPLATE, ["positive", "sentiment", "the"], fold_shared_label_tokens=True)
    with pytest.raises(ConfigError, match=r"3 distinct label tokens .* at most model.max_top_logprobs=2.*fewer labels"):
        APIScorer(client(url), one_token, "first", max_top_logprobs=2)
    with pytest.raises(ConfigError, match="reading every example's label"):
        APIScorer(client(url), one_token, "first").label_logprobs([[one_token.encode({"sentence": "a"})]], [[0]], "all")
    encoder = PromptEncoder(tokenizer, TEMPLATE, ["negative", "positive"], fold_shared_label_tokens=True)
    prompts, labels = prompts_with_demonstrations(encoder, 3)
    # a server that ignores logprobs, as `transformers serve` does
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, logprobs=False) as srv:
        with pytest.raises(ConfigError, match=r"returned no log-probs .* backend=hf"):
            APIScorer(client(srv.url), encoder, "first").label_logprobs(prompts, labels)
    # a server that returns fewer alternatives than asked for, and says so
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=5) as srv:
        with pytest.raises(APIError, match=r"refused the log-probs request \(logprobs=20\).*max_top_logprobs"):
            APIScorer(client(srv.url), encoder, "first").label_logprobs(prompts, labels)
    from joint_inference.runs.root import run_icl as run

    with pytest.raises(ConfigError, match="needs the server's address"):
        run(api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "x", "null"))


def test_extra_body_typed_on_the_command_line_reaches_every_request_body():
    """The README's example, as a user types it (the key's default is null, so a dict replaces it)."""
    from joint_inference.api.client import client_settings

    def settings_from_config(cfg):
        s = settings_of(cfg)
        return client_settings(s.model, s.api, s.output_dir, s.progress)

    cfg = compose(PRIMARY, ["backend=openai", "model=openai_compatible", "model.base_url=http://127.0.0.1:1/v1",
                            "model.extra_body={include_stop_str_in_output:true}", "output_dir=/tmp/x"])
    settings = settings_from_config(cfg)
    assert settings.extra_body == {"include_stop_str_in_output": True}
    assert APIClient(settings).body({"prompt": "x"})["include_stop_str_in_output"] is True
    assert settings_from_config(compose(PRIMARY, ["backend=openai", "model=openai_compatible",
                                                  "model.base_url=http://127.0.0.1:1/v1", "output_dir=/tmp/x"])
                                ).extra_body == {}


def test_429_and_5xx_are_retried_with_backoff(tiny_llama, server):
    _, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, ["negative", "positive"], fold_shared_label_tokens=True)
    prompts, labels = prompts_with_demonstrations(encoder, 5)
    want = APIScorer(client(server.url), encoder, "first", max_top_logprobs=400).label_logprobs(prompts, labels)
    server.fail_first = [429, 500, 503, 502]
    patient = client(server.url, concurrency=1)
    got = APIScorer(patient, encoder, "first", max_top_logprobs=400).label_logprobs(prompts, labels)
    torch.testing.assert_close(got, want)
    assert [r["status"] for r in server.requests[-9:]] == [429, 500, 503, 502, 200, 200, 200, 200, 200]
    assert patient.usage.retries == 4 and patient.usage.requests_sent == 5
    server.fail_first = [500] * 3
    with pytest.raises(APIError, match=r"no answer from .*/v1/completions after 3 tries \(last: HTTP 500"):
        APIScorer(client(server.url, max_retries=2, concurrency=1), encoder, "first",
                  max_top_logprobs=400).label_logprobs(prompts, labels)


def test_a_feature_the_server_lacks_is_one_error_and_never_retried(tiny_llama, caplog):
    """llama.cpp's server answers HTTP 500 to token-id prompts ("Input should be a valid string") and to log-prob
    requests when it was started without them: the same answer every time, so one request and one error that
    names the fix, not minutes of retries ending in generic advice."""
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, ["negative", "positive"], fold_shared_label_tokens=True)
    prompts, labels = prompts_with_demonstrations(encoder, 3)
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=400, unsupported=("token_ids",)) as srv:
        with pytest.raises(APIError, match=r"takes text prompts only.*HTTP 500: .*valid string.*"
                                           r"model.prompt_format=text"):
            APIScorer(client(srv.url, concurrency=1), encoder, "first", max_top_logprobs=400).label_logprobs(
                prompts, labels)
        sent = [json.dumps(r["body"]["prompt"]) for r in srv.requests]
        assert len(sent) == len(set(sent)) <= 3  # no prompt sent twice: nothing retried
        text = APIScorer(client(srv.url), encoder, "first", prompt_format="text", max_top_logprobs=400)
        with caplog.at_level(logging.INFO):
            assert text.label_logprobs(prompts, labels).shape == (3, 2)  # text prompts are served
        assert not [r for r in caplog.records if r.name.startswith("httpx")]  # no log line per request
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, unsupported=("logprobs",)) as srv:
        with pytest.raises(APIError, match=r"HTTP 500.*logprobs is not supported"):
            APIScorer(client(srv.url, concurrency=1), encoder, "first").label_logprobs(prompts, labels)
        sent = [json.dumps(r["body"]["prompt"]) for r in srv.requests]
        assert len(sent) == len(set(sent)) <= 3


def test_a_server_stopped_mid_run_is_a_clear_error_and_the_rerun_resumes_from_the_cache(
        tiny_llama, tiny_llama_dir, tiny_sst2_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    model, tokenizer = tiny_llama
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=400) as whole:
        want = run(api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "whole", whole.url, size=SMALL))
    total = len(posts(whole))
    first = OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=400, stop_after=2 + 16).start()
    cfg = api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", first.url, "api.max_retries=2", size=SMALL)
    with pytest.raises(APIError, match=r"no answer from http://127\.0\.0\.1:\d+/v1/completions after 3 tries.*"
                                       r"cached in .*api_cache.*start the same command again"):
        run(cfg)
    first.stop()
    cached = len(cached_answers(tmp_path / "run" / "api_cache"))
    assert cached == 16 and (tmp_path / "run" / "api_cache" / "capabilities.json").exists() and set(stages(tmp_path / "run")) == {"zero_shot/train", "zero_shot/test"}  # 12 + 4 of 8
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=400, port=first.port) as second:
        resumed = run(cfg)
    assert len(posts(second)) == total - 3 - cached  # nothing answered before is asked again, nor the probe's 3
    assert resumed["rounds"] == want["rounds"]
    assert_same_stages(tmp_path / "run", tmp_path / "whole")


def key_leaks(directory: Path) -> list[str]:
    return [str(p) for p in directory.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


def test_the_key_is_sent_but_never_written(tiny_llama, tiny_llama_dir, tiny_sst2_root, tmp_path, monkeypatch, capsys):
    """$OPENAI_API_KEY set: every request carries it, no file of the run directory (results, state, cache, usage)
    holds it, and a refused key's error names the variable, not the key."""
    from joint_inference.runs.root import run_icl as run

    model, tokenizer = tiny_llama
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, api_key=KEY, max_logprobs=400) as srv:
        run(api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", srv.url, size=SMALL))
        assert posts(srv) and all(r["authorization"] == f"Bearer {KEY}" for r in posts(srv))
        assert all(r["status"] == 200 or r["body"].get("logprobs") == 1000 for r in posts(srv))  # the probe's cap
        wrong = "sk-wrong-" + "0123456789" * 3
        monkeypatch.setenv("OPENAI_API_KEY", wrong)
        with pytest.raises(APIError, match=r"HTTP 401 .*sent with the key in \$OPENAI_API_KEY") as err:
            client(srv.url).post_many("completions", [{"model": "tiny", "prompt": "a", "max_tokens": 1}])
        assert wrong not in str(err.value)
    names = {p.name for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert {"results.json", "state.json", "api_usage.json"} <= names and (tmp_path / "run" / "api_cache").is_dir()
    out = capsys.readouterr()
    assert not key_leaks(tmp_path / "run") and KEY not in out.out + out.err


@pytest.mark.parametrize("override", [f"model.api_key_env={KEY}", f"+model.api_key={KEY}",
                                      f"model.extra_body={{authorization:'Bearer {KEY}'}}", f"seed={KEY}"])
def test_a_key_typed_on_the_command_line_is_refused_before_anything_is_written(override, tmp_path):
    """Hydra writes every override into the run directory's .hydra record: a value that looks like a key is refused
    before Hydra starts, with exit code 2, one ``error:`` line that does not echo it, and no file written."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "unsupervised_icl_llm.py"), "backend=openai",
                           "model=openai_compatible", "model.name=tiny", "model.base_url=http://127.0.0.1:9/v1",
                           override, f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "looks like an API key" in done.stderr and KEY not in done.stdout + done.stderr
    assert not (tmp_path / "run").exists() and not key_leaks(tmp_path)


def test_the_key_is_read_without_the_whitespace_around_it(server, monkeypatch):
    """A key file saved on Windows gives "key\r\n"; the key is what is sent, and a key that cannot be one (not
    ASCII) is refused without being echoed."""
    monkeypatch.setenv("OPENAI_API_KEY", f"  {KEY}\r\n")
    client(server.url).post_many("completions", [{"model": "tiny", "prompt": "a", "max_tokens": 1}])
    assert posts(server)[-1]["authorization"] == f"Bearer {KEY}"
    monkeypatch.setenv("OPENAI_API_KEY", KEY + "é")
    with pytest.raises(ConfigError, match=r"\$OPENAI_API_KEY holds characters that no key has") as err:
        client(server.url)
    assert KEY not in str(err.value)


@pytest.mark.slow
def test_the_key_never_reaches_hydras_files_or_the_console(tiny_llama, tiny_llama_dir, tiny_sst2_root, tmp_path):
    """The entry script in a subprocess: Hydra's config dumps (.hydra/), its log and the console stay clean too."""
    model, tokenizer = tiny_llama
    out = tmp_path / "run"
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, api_key=KEY, max_logprobs=400) as srv:
        done = subprocess.run(
            [sys.executable, str(REPO / "unsupervised_icl_llm.py"), "backend=openai", "model=openai_compatible",
             "model.name=tiny", f"model.pretrained={tiny_llama_dir}", f"model.base_url={srv.url}", "label_mode=first",
             "model.max_top_logprobs=400",
             f"dataset.data_root={tiny_sst2_root}", "dataset.num_examples=12", "N=2", "T=1", "num_repeats=2",
             "progress=false", f"hydra.run.dir={out}"], check=False, capture_output=True, text=True, cwd=REPO, env=env,
            timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert posts(srv) and all(r["authorization"] == f"Bearer {KEY}" for r in posts(srv))
    assert {"results.json", "state.json", "api_usage.json", "config.yaml"} <= {p.name for p in out.rglob("*")}
    assert not key_leaks(out) and KEY not in done.stdout + done.stderr


def cached_answers(directory: Path) -> list[Path]:
    """The answers kept (the server's capabilities aside)."""
    return sorted(p for p in directory.rglob("*.json") if p.name != "capabilities.json") if directory.exists() else []


def test_an_answer_that_cannot_be_read_is_one_error_and_never_cached(tiny_llama, tiny_llama_dir, tiny_sst2_root,
                                                                    tmp_path):
    """A server that leaves out the log-probs, or sends them in a form no client reads, costs one ``error:``
    (no traceback) and leaves nothing in the cache, so the same command asks again once the server is fixed;
    an unreadable answer that an earlier version cached is asked for again, not replayed."""
    from joint_inference.runs.root import run_icl as run

    model, tokenizer = tiny_llama
    cache = tmp_path / "cache"
    config = lambda name, url: api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / name, url,  # noqa: E731
                                          f"api.cache_dir={quoted(cache)}", size=SMALL)
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=400, logprobs=False) as srv:
        with pytest.raises(ConfigError, match="returned no log-probs.*the answer was not cached"):
            run(config("none", srv.url))
    assert cached_answers(cache) == []

    def words_for_numbers(answer):  # {" positive": "high"}: a server's bug
        for choice in answer["choices"]:
            if choice["logprobs"] is None:
                continue
            choice["logprobs"]["top_logprobs"] = [top and {t: "high" for t in top}
                                                  for top in choice["logprobs"]["top_logprobs"]]
        return answer

    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=400) as srv:
        completions = srv.completions
        srv.completions = lambda body: words_for_numbers(completions(body))
        with pytest.raises(ConfigError, match="a form this client cannot read.*the answer was not cached"):
            run(config("words", srv.url))
        assert cached_answers(cache) == []
        srv.completions = completions  # the server is fixed: the same command runs through
        first = run(config("words", srv.url))
        sent = len(posts(srv))
        spoiled = cached_answers(cache)[0]  # as an earlier version could have cached it
        spoiled.write_text(json.dumps({**json.loads(spoiled.read_text()),
                                       "response": words_for_numbers(json.loads(spoiled.read_text())["response"])}))
        again = run(config("again", srv.url))
        assert len(posts(srv)) == sent + 1  # that answer alone is asked for again
    assert again["rounds"] == first["rounds"] and again["zero_shot"] == first["zero_shot"]


@pytest.mark.slow
def test_ctrl_c_during_requests_is_one_line_and_the_answers_are_kept(tiny_llama, tiny_llama_dir, tiny_sst2_root,
                                                                     tmp_path):
    """SIGINT while requests are in flight: exit code 130, one line saying what is kept and how to resume, no
    traceback; the answers that arrived are in the cache, and the same command then finishes asking only for
    the others."""
    import signal

    model, tokenizer = tiny_llama
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    # 44 requests at a second each: the run is still asking when the signal comes, even on a loaded machine
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, api_key=KEY, delay_s=1.0, max_logprobs=400) as srv:
        command = [sys.executable, str(REPO / "unsupervised_icl_llm.py"), "backend=openai", "model=openai_compatible",
                   "model.name=tiny", f"model.pretrained={tiny_llama_dir}", f"model.base_url={srv.url}",
                   "label_mode=first", "model.max_top_logprobs=400", f"dataset.data_root={tiny_sst2_root}", *SMALL,
                   "api.concurrency=1",
                   "progress=false", f"hydra.run.dir={tmp_path / 'run'}"]
        # SIGINT as a terminal sends it, even where pytest itself runs as a background job (which ignores it)
        started = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                   env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120

        def wait_for(done):
            while not done() and time.monotonic() < deadline and started.poll() is None:
                time.sleep(0.05)

        # the capability probe's requests first (kept in capabilities.json once answered), then 3 of the run's own
        wait_for((tmp_path / "run" / "api_cache" / "capabilities.json").exists)
        probed = len(posts(srv))
        wait_for(lambda: len(posts(srv)) >= probed + 3)
        started.send_signal(signal.SIGINT)
        _, stderr = started.communicate(timeout=60)
        assert started.returncode == 130, stderr[-2000:]
        assert stderr.strip().splitlines()[-1].startswith("interrupted: what finished is kept in")
        assert "Traceback" not in stderr
        kept = cached_answers(tmp_path / "run" / "api_cache")
        assert kept
        sent, srv.delay_s = len(posts(srv)), 0.0
        done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        # every request of the second start is one the cache lacked: the kept answers were not paid for again
        assert len(posts(srv)) - sent == len(cached_answers(tmp_path / "run" / "api_cache")) - len(kept) > 0


# ---------------------------------------------------------------------------------- dry run
def test_dry_run_counts_requests_tokens_and_cost_and_sends_nothing(tiny_llama_dir, tiny_sst2_root, tmp_path,
                                                                   server, capsys):
    from joint_inference.runs.root import run_icl as run

    prices = ["model.price_per_million_input_tokens=2.5", "model.price_per_million_output_tokens=10"]
    summary = run(api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", server.url, "dry_run=true", *prices,
                             size=SMALL))
    assert not server.requests and not (tmp_path / "run").exists()
    assert summary["requests"] + summary["duplicates"] == 44 and summary["cached"] == 0
    assert summary["output_tokens"] == summary["max_output_tokens"] == summary["requests"]  # one token each
    assert summary["cost_usd"] == pytest.approx((summary["prompt_tokens"] * 2.5 + summary["requests"] * 10) / 1e6)
    printed = capsys.readouterr().out
    assert f"{summary['requests']:,} requests" in printed and "cost at $2.5/M input" in printed
    # after a real run, a dry run follows the cached answers: nothing left to pay for
    run(api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", server.url, size=SMALL))
    again = run(api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", server.url, "dry_run=true", size=SMALL))
    assert again["requests"] == 0 and again["cached"] + again["duplicates"] == 44
    assert again["cost_usd"] is None


# --------------------------------------------------------------------------------- generation
QUESTIONS = [f"What is {i} plus {i + 1}?" for i in range(5)]


def test_gsm8k_through_the_api_equals_backend_hf(tiny_llama_dir, tmp_path, server):
    from joint_inference.runs.root import run_icl as run

    write_jsonl(tmp_path / "data" / "gsm8k" / "test.jsonl",
                [{"question": q, "answer": f"Add them.\n#### {2 * i + 1}"} for i, q in enumerate(QUESTIONS)])
    common = ["dataset=gsm8k", f"dataset.data_root={quoted(tmp_path / 'data')}", "N=2", "T=1", "num_repeats=2",
              "max_new_tokens=10", "device=cpu", "progress=false", "supervised_icl=false"]
    want = run(compose(PRIMARY, [*common, f"model.pretrained={quoted(tiny_llama_dir)}", "model.embedded=null",
                                 "model.name=tiny", "forward_batch_size=3", f"output_dir={quoted(tmp_path / 'hf')}"]))
    got = run(compose(PRIMARY, [*common, "backend=openai", "model=openai_compatible", "model.name=tiny",
                                f"model.pretrained={quoted(tiny_llama_dir)}", f"model.base_url={server.url}",
                                f"output_dir={quoted(tmp_path / 'api')}"]))
    answers = [(tmp_path / d / "answers.jsonl").read_text() for d in ("hf", "api")]
    assert answers[0] == answers[1] and got["rounds"] == want["rounds"]
    bodies = [r["body"] for r in posts(server)]
    assert len(bodies) == 5 + 5  # greedy: one request per prompt (zero-shot, round 1), its text used for both votes
    assert any("Q: What is 0 plus 1?\nA:" in b["prompt"] for b in bodies)
    assert all(b["max_tokens"] == 10 and b["temperature"] == 0 and "n" not in b for b in bodies)
    assert all(b["stop"] == ["\n\nQ:", "\nQ:"] for b in bodies)


class ScriptedClient:
    """Answers completions with a fixed text; records the bodies."""

    dry_run = False

    def __init__(self, text):
        self.text, self.bodies = text, []

    def body(self, fields):
        return {"model": "m", **fields}

    def post_many(self, path, bodies, desc=None, prompt_tokens=None, check=None):
        self.bodies += bodies
        answers = [{"choices": [{"index": i, "text": f"{self.text} #{i}"} for i in range(b.get("n", 1))]} for b in bodies]
        assert check is None or all(check(a) is None for a in answers)
        return answers


def test_responses_are_cut_as_the_local_backends_cut_them():
    answer_is = tuple(f"answer is ({x})" for x in "ABCDEFGHIJ")
    settings = SamplingSettings(64, 0.7, 0.9, stop=("\n\nQuestion:", "\nQuestion:"), stop_after=answer_is)
    scripted = ScriptedClient("It is 4, so the answer is (C). Then more\nQuestion: next")
    texts = APIGenerator(scripted, settings).generate(["p1", "p2"], 3, seed=5)
    assert texts == [["It is 4, so the answer is (C)"] * 3] * 2
    probe, body, second = scripted.bodies  # the first prompt asks once whether the server takes n
    assert probe == body and body["stop"] == ["\n\nQuestion:", "\nQuestion:"] and body["n"] == 3 and body["top_p"] == 0.9
    assert body["seed"] != second["seed"]  # each prompt its own seed
    chat = APIGenerator(ScriptedClient("x"), SamplingSettings(8), endpoint="chat", max_stop_strings=1)
    assert chat.body("hello", 1, 0) == ("chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0.0})


def test_a_server_that_ignores_n_gets_separate_seeded_requests_said_once(tiny_llama, tmp_path, caplog):
    """llama.cpp's server answers one choice whatever n asks: the samples are then separate requests with their own
    seeds, the same number of samples per prompt, and one warning says so; a server that takes n gets one request
    per prompt."""
    model, tokenizer = tiny_llama
    settings = SamplingSettings(6, 0.8, 0.95)
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, unsupported=("n",)) as srv:
        generator = APIGenerator(client(srv.url, cache_dir=str(tmp_path / "cache")), settings)
        with caplog.at_level(logging.WARNING):
            first = generator.generate(["one", "two"], 3, seed=1)
            second = generator.generate(["three"], 3, seed=2)
        bodies = [r["body"] for r in srv.requests]
    assert [len(t) for t in first + second] == [3, 3, 3]
    assert bodies[0]["n"] == 3 and all(b["n"] == 1 for b in bodies[1:]) and len(bodies) == 1 + 6 + 3
    seeds = [b["seed"] for b in bodies[1:]]
    assert len(set(seeds)) == len(seeds)
    assert sum("ignores n" in r.getMessage() for r in caplog.records) == 1
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer) as srv:
        takes = APIGenerator(client(srv.url, cache_dir=str(tmp_path / "cache2")), settings)
        assert [len(t) for t in takes.generate(["one", "two"], 3, seed=1)] == [3, 3]
        assert [r["body"]["n"] for r in srv.requests] == [3, 3]  # the probe's answer is cached: no third request


# ---------------------------------------------------------------------------------------- MMMU
def pil(color, size=(8, 6)):
    from PIL import Image

    return Image.new("RGB", size, color)


def mmmu_rows(subject: str, pro: bool = False) -> list[dict]:
    """Five questions in the hub's schema: four multiple-choice (one with two images) and one open."""
    rows = []
    for i in range(5):
        open_q = i == 4 and not pro
        options = [] if open_q else [f"choice {j} of q{i}" for j in range(10 if pro else 4)]
        row = {"id": f"validation_{subject}_{i + 1}", "question": f"<image 1> {subject} question {i}?",
               "options": str(options), "explanation": "", "img_type": "['Diagrams']",
               "answer": "12.5" if open_q else "ABCD"[i % 4], "topic_difficulty": "Easy",
               "image_1": pil((40 * i, 10, 200)), "image_2": pil((1, 2, 3), (5, 5)) if i == 1 else None}
        row.update({f"image_{k}": None for k in range(3, 8)})
        if pro:
            row["subject"] = subject
        else:
            row.update(question_type="open" if open_q else "multiple-choice", subfield="x")
        rows.append(row)
    return rows


def write_parquet(rows: list[dict], path: Path) -> None:
    import datasets

    features = datasets.Features({k: datasets.Image() if k.startswith("image_") else datasets.Value("string")
                                  for k in rows[0]})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


@pytest.fixture()
def mmmu_root(tmp_path):
    for subject in ("Art", "Math"):
        write_parquet(mmmu_rows(subject), tmp_path / "data" / "mmmu" / subject / "validation.parquet")
    write_parquet(mmmu_rows("Art", pro=True) + mmmu_rows("Math", pro=True), tmp_path / "data" / "mmmu_pro" / "test.parquet")
    return tmp_path / "data"


def decoded(url: str):
    from PIL import Image

    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_mmmu_prompts_follow_the_original(mmmu_root):
    from joint_inference.methods.mmmu import load_subject

    cfg = compose(PRIMARY, ["+experiment=mmmu_gpt4o", f"dataset.data_root={quoted(mmmu_root)}"])
    assert (cfg.backend, cfg.model.name, cfg.model.endpoint, cfg.dataset.name) == ("openai", "gpt-4o-2024-08-06",
                                                                                   "chat", "mmmu")
    assert (cfg.T, cfg.num_repeats, cfg.N, cfg.temperature, cfg.max_new_tokens, cfg.seed) == (3, 1, 8, 0.0, 4000, 0)
    assert len(cfg.dataset.subjects) == 30
    fmt = MMMUFormat.from_template(settings_of(cfg).template)
    rows = load_subject(settings_of(cfg).dataset, "Art")
    assert [r["question_type"] for r in rows] == ["multiple-choice"] * 4 + ["open"] and len(rows[1]["image_urls"]) == 2
    messages = fmt.messages(rows[1], [(rows[0], "Because. Answer: A")])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"][0]["text"].startswith("Answer the following multiple-choice question.")
    text, *images = messages[-1]["content"]
    assert text["text"] == ("image 1 Art question 1?\nA. choice 0 of q1\nB. choice 1 of q1\nC. choice 2 of q1\n"
                            "D. choice 3 of q1\nThe last line of your response should be of the following format: "
                            "'Answer: $LETTER' (without quotes) where LETTER is one of the options. Think step by step "
                            "before answering.")
    assert [i["image_url"]["detail"] for i in images] == ["low", "low"]
    assert decoded(images[0]["image_url"]["url"]).getpixel((0, 0)) == (40, 10, 200)
    assert decoded(images[1]["image_url"]["url"]).size == (5, 5)
    assert messages[2]["content"] == [{"type": "text", "text": "Because. Answer: A"}]
    open_text = fmt.messages(rows[4])[-1]["content"][0]["text"]
    assert open_text.startswith("image 1 Art question 4?\n\nDo not use latex.")
    assert fmt.messages(rows[4])[0]["content"][0]["text"].startswith("Answer the following open-ended question.")
    pro = compose(PRIMARY, ["+experiment=mmmu_gpt4o", "dataset=mmmu_pro", f"dataset.data_root={quoted(mmmu_root)}"])
    assert pro.dataset.name == "mmmu_pro" and pro.template.system == cfg.template.system
    pro_rows = load_subject(settings_of(pro).dataset, "Math")
    assert len(pro_rows) == 5 and all(r["subject"] == "Math" and len(r["options"]) == 10 for r in pro_rows)
    assert "J. choice 9 of q0" in MMMUFormat.from_template(settings_of(pro).template).question_text(pro_rows[0])
    with pytest.raises(ConfigError, match="not one of the 4 options' letters"):
        question_row({**mmmu_rows("Art")[0], "answer": "E"}, "Art", "row")


def test_mmmu_answers_are_read_as_the_protocol_says():
    assert read_choice("Think... so B.\nAnswer: C", "ABCD") == ("C", True)
    assert read_choice("Answer: A at first.\n**Answer: (D)**", "ABCD") == ("D", True)
    assert read_choice("Answer: E", "ABCD") == (None, False)  # not an option, no other letter
    assert read_choice("The best answer is (B).", "ABCD") == ("B", False)
    assert read_choice("I pick C here", "ABCD") == ("C", False)
    assert read_choice("Answer: Because it is", "ABCD") == (None, False)
    assert read_open("so x = 12.50.\nThe final answer is 12.50.") == "12.50"
    assert open_correct("12.50", "12.5") and open_correct("Paris", "['paris', 'Paris, France']")
    assert not open_correct("13", "12.5") and not open_correct(None, "1")
    assert original_reading("The best answer is (B). Answer: C") == ("B", 1)
    assert original_reading("first answer: A then Answer: C\nanswer: D") == ("C", 2)
    assert original_reading("no statement, maybe A or B") == ("B", 3)


def test_mmmu_demonstration_pool_follows_the_protocol():
    """The original lets every open response demonstrate, read or not, and a multiple-choice one only where its
    "answer:" pattern reads it; clean asks both for a stated final answer."""
    from joint_inference.methods.mmmu import MMMUTask, round_prompts

    rows = [{"id": str(i), "question_type": kind, "question": f"q{i}", "options": ["x", "y"] if kind == MC else [],
             "answer": "A" if kind == MC else "1", "image_urls": []}
            for i, kind in enumerate([MC, MC, OPEN, OPEN])]
    responses = ["so. Answer: B", "I think B", "The final answer is 3", "no idea"]
    fmt = MMMUFormat({MC: "sys mc", OPEN: "sys open"}, {MC: "end mc", OPEN: "end open"})
    pools = {}
    for protocol in ("original", "clean"):
        task = MMMUTask(rows, protocol)
        answers = [task.read(q, r)[1] for q, r in enumerate(responses)]
        previous = {"answers": answers, "responses": responses}
        _, info = round_prompts(task, fmt, previous, n_shots=2, num_repeats=1, key=(0,), name="round_1")
        pools[protocol] = info["pool_size"]
        assert answers[3] is None  # the last response states nothing either way
    assert pools == {"original": 3, "clean": 2}


def mmmu_responder(messages):
    """A deterministic 'model': right on even questions, wrong on odd ones, no statement on question 3; open
    questions answer 12.50. It checks that each image decodes."""
    user = messages[-1]["content"]
    for part in user[1:]:
        decoded(part["image_url"]["url"])
    text = user[0]["text"]
    q = int(re.search(r"question (\d)", text)[1])
    if "open-ended" in messages[0]["content"][0]["text"]:
        return "Compute. The final answer is 12.50"
    if q == 3:
        return "I cannot tell."
    gold = "ABCD"[q % 4]
    return f"Reasoning about q{q}.\nAnswer: {gold if q % 2 == 0 else 'ABCD'[(q + 1) % 4]}"


def test_mmmu_rounds_through_the_api(mmmu_root, tiny_llama, tmp_path):
    from joint_inference.runs.root import run_icl as run

    model, tokenizer = tiny_llama
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, chat_responder=mmmu_responder) as srv:
        overrides = ["+experiment=mmmu_gpt4o", f"dataset.data_root={quoted(mmmu_root)}", "dataset.subjects=[Art,Math]",
                     f"model.base_url={srv.url}", "T=1", "N=2", "progress=false", "api.backoff_s=0.01"]
        results = run(compose(PRIMARY, [*overrides, f"output_dir={quoted(tmp_path / 'run')}"]))
        sent = posts(srv)
        # zero-shot: each of the 10 questions once; round 1: again, after demonstrations
        assert len(sent) == 20 and all(r["path"] == "/v1/chat/completions" for r in sent)
        assert sent[0]["body"]["max_tokens"] == 4000 and sent[0]["body"]["seed"] == 0
        assert sent[0]["body"]["temperature"] == 0.0 and sent[0]["body"]["model"] == "gpt-4o-2024-08-06"
        dry = run(compose(PRIMARY, [*overrides, "dry_run=true", f"output_dir={quoted(tmp_path / 'run')}"]))
        assert len(posts(srv)) == 20 and dry["requests"] == 0 and dry["cached"] == 20
    # q0, q2 right; q1 wrong; q3 unanswered; q4 (open) right: 3 of 5 in each subject
    assert results["zero_shot"]["test_accuracy"] == results["zero_shot"]["macro_accuracy"] == 0.6
    assert results["zero_shot"]["per_subject"] == {"Art": 0.6, "Math": 0.6} and results["num_test"] == 10
    assert results["rounds"][0]["pool_size"] == 8  # three stated letters and the open answer, per subject
    rows = [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    rounds = [r for r in sent if len(r["body"]["messages"]) > 2]
    assert len(rounds) == 10
    for request in rounds:
        messages = request["body"]["messages"]
        query = messages[-1]["content"][0]["text"]
        subject, q = re.search(r"(\w+) question (\d)", query).groups()
        demos = [m for m in messages[1:-1]]
        assert [m["role"] for m in demos] == ["user", "assistant"] * 2
        for user, assistant in zip(demos[::2], demos[1::2]):
            demo_subject, d = re.search(r"(\w+) question (\d)", user["content"][0]["text"]).groups()
            assert demo_subject == subject and d != q and d != "3"  # same subject, never itself, stated answers only
            assert assistant["content"][0]["text"] == by_id[f"validation_{subject}_{int(d) + 1}"]["zero_shot"]["response"]
            assert len(user["content"]) == (3 if d == "1" else 2)  # the demonstration's images travel with it
            if q != "4":
                assert d != "4"  # multiple-choice questions see multiple-choice demonstrations
    assert set(rows[0]) == {"id", "subject", "question_type", "gold", "zero_shot", "rounds"}
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| Art | 60.0% |" in table and "macro" in table


def test_mmmu_pro_and_resume(mmmu_root, tiny_llama, tmp_path):
    from joint_inference.runs.root import run_icl as run

    model, tokenizer = tiny_llama
    cfg = ["+experiment=mmmu_gpt4o", "dataset=mmmu_pro", f"dataset.data_root={quoted(mmmu_root)}",
           "dataset.subject=Math", "T=1", "N=3", "progress=false", f"output_dir={quoted(tmp_path / 'run')}"]
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, chat_responder=mmmu_responder) as srv:
        dry = run(compose(PRIMARY, [*cfg, f"model.base_url={srv.url}", "dry_run=true"]))
        assert not srv.requests and dry["requests"] == 10 and dry["cached"] == 0  # zero-shot 5, round 1 5
        assert dry["prompt_tokens"] > 85 * (6 + 5 * 3 * 1)  # 6 images zero-shot, 3 demonstrations' at least in round 1
        assert dry["max_output_tokens"] == 10 * 4000 and dry["cost_usd"] < dry["max_cost_usd"]
        results = run(compose(PRIMARY, [*cfg, f"model.base_url={srv.url}"]))
        assert len(posts(srv)) == 10 and results["settings"]["subjects"] == ["Math"]
        again = run(compose(PRIMARY, [*cfg, f"model.base_url={srv.url}"]))  # finished: read back, nothing sent
        assert len(posts(srv)) == 10 and again["rounds"] == results["rounds"]
    assert results["zero_shot"]["test_accuracy"] == 0.6  # q0, q2, q4 right (q4 is multiple-choice in MMMU-Pro)
    with pytest.raises(ConfigError, match="add backend=openai"):
        run(compose(PRIMARY, [*cfg[1:], "backend=hf", f"output_dir={quoted(tmp_path / 'hf')}"]))


def test_the_config_files_compose():
    cfg = compose(PRIMARY, ["model=openai_compatible", "backend=openai"])
    assert cfg.model.pretrained == "openai_compatible" and cfg.model.endpoint == "completions"
    assert cfg.api.concurrency == 8 and cfg.api.cache_dir is None
    assert OmegaConf.select(cfg, "model.api_key") is None  # the key is never a config value
    assert not re.search(r"sk-|api_key:", (REPO / "configs" / "model" / "gpt-4o-2024-08-06.yaml").read_text())
    assert np.isclose(compose(PRIMARY, ["model=gpt-4o-2024-08-06"]).model.price_per_million_input_tokens, 2.5)


# ------------------------------------------------------------------------- servers as they are
LLAMA_CPP = dict(unsupported=("token_ids", "n"), max_logprobs=5000)  # text prompts only, no n, echo, any top-k


def default_api_config(model_dir, data_root, out_dir, url, *extra):
    """The README's command: nothing set but the server, the model and the data."""
    return compose(PRIMARY, [
        "backend=openai", "model=openai_compatible", "model.name=tiny", f"model.pretrained={quoted(model_dir)}",
        f"model.base_url={url}", "dataset=sst2", f"dataset.data_root={quoted(data_root)}", *FULL, "device=cpu",
        "progress=false", "api.backoff_s=0.01", "api.max_backoff_s=0.05", "api.concurrency=4",
        f"output_dir={quoted(out_dir)}", *extra])


def test_a_llama_cpp_like_server_with_default_settings_equals_backend_hf_and_reruns_without_it(
        tiny_llama, tiny_llama_dir, tiny_sst2_root, tmp_path, caplog):
    """A server that refuses token ids, ignores n, echoes and returns any number of alternatives: the probe
    picks text prompts; reads missing a label among the default 20 are asked again with 1,000, so every stage
    equals backend=hf's. The capabilities are kept, so a rerun whose answers are cached needs no server."""
    from joint_inference.runs.root import run_icl as run

    model, tokenizer = tiny_llama
    want = run(hf_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "hf"))
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, **LLAMA_CPP) as srv:
        with caplog.at_level(logging.INFO):
            got = run(default_api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "api", srv.url))
        sent = posts(srv)
    assert_same_stages(tmp_path / "api", tmp_path / "hf")
    assert [{k: v for k, v in r.items() if k != "diagnostics"} for r in got["rounds"]] == \
        [{k: v for k, v in r.items() if k != "diagnostics"} for r in want["rounds"]]
    line = [r.getMessage() for r in caplog.records if r.name == "joint_inference.api.capabilities"]
    assert len(line) == 1 and re.search(r"text prompts \(token ids refused\), echo: exact label log-probs, up to "
                                        r"\d+ alternatives", line[0])
    caps = json.loads((tmp_path / "api" / "api_cache" / "capabilities.json").read_text())
    (entry,) = caps.values()
    assert entry["token_prompts"] is False and entry["echo"] is True and entry["models"] == ["tiny"]
    assert [r["status"] for r in sent[:3]] == [500, 200, 200]  # the probe: token ids refused once, nothing retried
    scoring = sent[3:]
    assert all(isinstance(r["body"]["prompt"], str) and r["status"] == 200 for r in scoring)
    # the default 20, then the probed limit, then echo (logprobs=1) for what even that missed
    assert {r["body"]["logprobs"] for r in scoring} <= {20, entry["top_logprobs"], 1}
    assert all(bool(r["body"].get("echo")) == (r["body"]["logprobs"] == 1) for r in scoring)
    # the server gone: the same command in another directory, the same cache, gives the same results
    again = run(default_api_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "again", srv.url,
                                   f"api.cache_dir={quoted(tmp_path / 'api' / 'api_cache')}"))
    assert again["rounds"] == got["rounds"] and again["zero_shot"] == got["zero_shot"]


def test_reads_missing_a_label_are_asked_again_then_scored_with_echo(tiny_llama, tmp_path):
    """k=2 misses labels, the server's cap still misses some: those are scored with echo. Every score equals the
    hf scorer's; only the reads that missed are asked again, and only those still missing get echo requests."""
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, ["negative", "positive"], fold_shared_label_tokens=True)
    prompts, labels = prompts_with_demonstrations(encoder, 24)
    seqs = sorted({tuple(encoder.assemble(p, lab)[0]) for p, lab in zip(prompts, labels)})
    with torch.no_grad():
        want = Scorer(model, encoder, "auto", batch_size=4, show_progress=False).label_logprobs(prompts, labels)
        full = torch.stack([torch.log_softmax(model(torch.tensor([s])).logits[0, -1], -1) for s in seqs])
    columns = [ids[0] for ids in encoder.label_ids]
    worst = (full > full[:, columns].min(-1, keepdim=True).values).sum(-1)  # tokens above the less likely label
    cap = int(worst.sort().values[len(seqs) // 2])  # about half the reads complete at the server's cap
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=cap) as srv:
        scorer = APIScorer(client(srv.url, cache_dir=str(tmp_path / "cache")), encoder, "auto", prompt_format="auto",
                           score_with="auto", max_top_logprobs=2)
        got = scorer.label_logprobs(prompts, labels)
        bodies = [r["body"] for r in posts(srv)[3:]]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert scorer.server_top == cap and scorer.floored == 0
    first, second = [b for b in bodies if b.get("logprobs") == 2], [b for b in bodies if b.get("logprobs") == cap]
    echoed = [b for b in bodies if b.get("echo")]
    assert len(first) == len(seqs) and len(second) == int((worst >= 2).sum())
    assert len(echoed) == 2 * int((worst >= cap).sum()) > 0  # one request a label, for the reads still missing


@pytest.mark.parametrize("server_echoes", [True, False])
def test_multi_token_labels_are_exact_with_echo(tiny_llama, server_echoes):
    """Labels sharing their first token: label_mode=auto is exact, as in the hf scorer, when the server echoes
    (one request per label, the sum of its tokens' log-probs); without echo, the top-k refusal names the fix."""
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, ["zebra crossing", "zebra stripes", "qux"],
                            fold_shared_label_tokens=True)
    prompts, labels = prompts_with_demonstrations(encoder, 6)
    unsupported = () if server_echoes else ("echo",)
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, max_logprobs=400, unsupported=unsupported) as srv:
        scorer = APIScorer(client(srv.url), encoder, "auto", prompt_format="auto", score_with="auto")
        if not server_echoes:
            with pytest.raises(ConfigError, match="share their first token.*label_mode=bot_minimal"):
                scorer.label_logprobs(prompts, labels)
            return
        got = scorer.label_logprobs(prompts, labels)
        echoed = [r for r in posts(srv) if r["body"].get("echo")][1:]  # after the probe's
    with torch.no_grad():
        hf = Scorer(model, encoder, "auto", batch_size=4, show_progress=False)
        want = hf.label_logprobs(prompts, labels)
    assert hf.mode == scorer.mode == "exact" and scorer.score_with == "echo"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert len(echoed) == 3 * len({json.dumps(encoder.assemble(p, lab)[0]) for p, lab in zip(prompts, labels)})


def test_what_the_server_lacks_or_does_not_serve_is_said(tiny_llama, tmp_path, caplog):
    model, tokenizer = tiny_llama
    encoder = PromptEncoder(tokenizer, TEMPLATE, ["negative", "positive"], fold_shared_label_tokens=True)
    prompts, labels = prompts_with_demonstrations(encoder, 3)
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, name="served-id") as srv:
        with pytest.raises(APIError, match=r"serves \['served-id'\], not model.name='tiny'.*model.name='served-id'"):
            APIScorer(client(srv.url), encoder, score_with="auto").label_logprobs(prompts, labels)
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, unsupported=("echo",), max_logprobs=400) as srv:
        with pytest.raises(ConfigError, match=r"score_with=echo, but the server .* returns no prompt log-probs"):
            APIScorer(client(srv.url), encoder, score_with="echo").label_logprobs(prompts, labels)
        with caplog.at_level(logging.WARNING):  # the tiny tokenizer has no chat template
            APIScorer(client(srv.url), encoder, endpoint="chat", max_top_logprobs=400).label_logprobs(prompts, labels)
        assert any("has no chat template" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="score_with=echo needs model.endpoint=completions"):
        APIScorer(client("http://127.0.0.1:9/v1"), encoder, endpoint="chat", score_with="echo")


def test_requests_per_second_leaves_out_the_retry_waits(tiny_llama):
    model, tokenizer = tiny_llama
    with OpenAICompatibleServer(model=model, tokenizer=tokenizer, fail_first=[503, 503]) as srv:
        slow = APIClient(ClientSettings(base_url=srv.url, model="tiny", show_progress=False, backoff_s=0.4,
                                        max_backoff_s=0.4, concurrency=1))
        slow.post_many("completions", [{"model": "tiny", "prompt": "a b", "max_tokens": 1}])
    usage = slow.usage
    assert usage.retries == 2 and usage.seconds - usage.busy_seconds >= 0.35  # two waits of 0.2 to 0.4 s
    assert usage.as_dict()["requests_per_second"] == pytest.approx(1 / usage.busy_seconds)
