"""Cluster launcher config and the results collector."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import CONFIG_DIR, REPO


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("unsupervised_icl_llm", ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min == 720


def test_collect_results_table(tmp_path):
    def write(path, model, task, zs, sup, rounds, final=None):
        path.mkdir(parents=True)
        result = {"model": model, "task": task, "zero_shot": {"test_accuracy": zs},
                  "supervised_icl": {"test_accuracy": sup}, "rounds": [{"round": i + 1, "test_accuracy": a}
                                                                        for i, a in enumerate(rounds)]}
        if final is not None:
            result = {"model": model, "task": task, "zero_shot": {"test_accuracy": zs}, "final": {"test_accuracy": final}}
        (path / "results.json").write_text(json.dumps(result))

    write(tmp_path / "multirun" / "0", "m", "sst2", 0.5, 0.8, [0.6, 0.7])
    write(tmp_path / "multirun" / "1", "m", "sst2", 0.5, 0.8, [0.6, 0.9])
    write(tmp_path / "outputs" / "a", "m", "trec", 0.25, 0.5, [0.4])
    write(tmp_path / "outputs" / "ft", "m", "trec", 0.25, None, [], final=0.45)
    (tmp_path / "outputs" / "broken").mkdir()
    (tmp_path / "outputs" / "broken" / "results.json").write_text("{")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "collect_results.py"), str(tmp_path / "multirun"),
                          str(tmp_path / "outputs"), "--csv", str(tmp_path / "t.csv")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "| model | task | zero-shot | supervised ICL | unsupervised ICL | unsupervised FT |"
    assert lines[2] == "| m | sst2 | 50.0 ± 0.0 (n=2) | 80.0 ± 0.0 (n=2) | 80.0 ± 10.0 (n=2) |  |"
    assert lines[3] == "| m | trec | 25.0 ± 0.0 (n=2) | 50.0 | 40.0 | 45.0 |"
    assert "skipping" in out.stderr
    assert (tmp_path / "t.csv").read_text().splitlines()[1].startswith("m,sst2,50.0 ± 0.0 (n=2)")
