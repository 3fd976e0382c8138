"""Faults of the machine and of what the user typed around the run: a full disk, a cache folder that is a file,
a killed write's leftovers, a folder that cannot be written, a value Hydra's parser cannot read. Each is one
``error:`` (a ConfigError) naming the problem and the fix, and nothing already saved is lost."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from joint_inference.api.cache import RequestCache
from joint_inference.core.errors import ConfigError
from joint_inference.core.utils import atomic_write_json
from joint_inference.runs.cli import check_command_line
from joint_inference.runs.rundir import run_directory
from tests.conftest import CONFIG_DIR


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_error_and_the_saved_file_stays(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    atomic_write_json(results, {"saved": 1})
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(ConfigError, match=r"could not write .*results.json \(No space left on device\); free some "
                                          r"space .* what was saved before is kept"):
        atomic_write_json(results, {"saved": 2})
    assert results.read_text() == '{\n  "saved": 1\n}\n' and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_an_answer_the_cache_cannot_keep_is_one_error_and_the_kept_ones_stay(tmp_path, monkeypatch):
    cache = RequestCache(tmp_path / "cache")
    cache.put("ab" * 32, "http://x/v1/completions", "m", {"choices": [1]})
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(ConfigError, match=r"could not keep an answer in the cache .* \(No space left on device\); "
                                          r"the answers kept before stay there"):
        cache.put("cd" * 32, "http://x/v1/completions", "m", {"choices": [2]})
    assert cache.get("ab" * 32) == {"choices": [1]} and cache.get("cd" * 32) is None
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_a_cache_folder_that_is_a_file_is_refused_before_any_request(tmp_path):
    from joint_inference.api.client import APIClient, ClientSettings

    (tmp_path / "answers").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"api.cache_dir=.*answers.* cannot be created: .*answers is a file"):
        APIClient(ClientSettings(base_url="http://127.0.0.1:9/v1", model="m", cache_dir=str(tmp_path / "answers")))


def test_a_killed_writes_leftovers_are_removed_when_the_directory_is_next_held(tmp_path):
    run = tmp_path / "run"
    with run_directory(run, "unsupervised_icl_llm", None):
        atomic_write_json(run / "results.json", {"done": True})
    leftovers = [run / ".results.json.k1w2.tmp", run / "api_cache" / "ab" / ".abababab.x9.tmp"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    with run_directory(run, "unsupervised_icl_llm", None):
        pass
    assert not any(path.exists() for path in leftovers) and (run / "results.json").exists()


def test_a_current_folder_that_cannot_be_written_is_refused_before_hydra_makes_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    with pytest.raises(ConfigError, match="hydra.run.dir=outputs cannot be written: .* is read-only to this user"):
        check_command_line(["N=2"], Path(CONFIG_DIR))
    check_command_line(["N=2", f"hydra.run.dir={tmp_path.parent / 'elsewhere'}"], Path(CONFIG_DIR))  # named: fine
    check_command_line(["--help"], Path(CONFIG_DIR))  # nothing is written for --help


@pytest.mark.parametrize(("arg", "quoted"), [
    ("dataset.path=/data/données.csv", "'dataset.path=\"/data/données.csv\"'"),
    ("labelset.names=[négatif,positif]", "'labelset.names=[\"négatif\",\"positif\"]'"),
])
def test_an_unquoted_value_beyond_ascii_gets_a_hint_hydra_does_not_give(arg, quoted):
    with pytest.raises(ConfigError, match="an unquoted value may hold ASCII characters only; quote the text") as err:
        check_command_line([arg], Path(CONFIG_DIR))
    assert quoted in str(err.value)
    check_command_line([f"{arg.split('=')[0]}={quoted[1:-1].split('=', 1)[1]}"], Path(CONFIG_DIR))  # as suggested
