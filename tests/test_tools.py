"""Cluster launcher config and the results collector."""
from __future__ import annotations

import csv
import json
import statistics
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


# ----------------------------------------------------------------------------- collect_results.py
# Run directories as uicl.py, uft.py and uicl_generation.py write them (the fields the collector reads).

ICL_SETTINGS = {"N": 16, "T": 2, "num_repeats": 5, "seed": 0, "label_mode": "first", "support_sampling": "per_query",
                "protocol": "clean", "transductive": False, "block_size": 32, "template": "Review: {text}\nSentiment:",
                "labels": ["negative", "positive"], "device": "cpu"}


def write_icl(directory, zero_shot=0.5, supervised=0.8, rounds=(0.6, 0.7), data="d" * 16, model="m", task="sst2",
              settings=True, **changed):
    result = {"task": task, "model": model, "num_train": 100, "num_test": 50,
              "zero_shot": {"train_accuracy": 0.5, "test_accuracy": zero_shot},
              "supervised_icl": {"test_accuracy": supervised, "test_accuracy_mean": supervised,
                                 "test_accuracy_std": 0.0, "pool_size": 100, "protocol": "clean"},
              "rounds": [{"round": t, "test_accuracy": a} for t, a in enumerate(rounds, 1)],
              "timing": {"seconds": 1.0, "prompts_scored": 10}}
    if settings:
        result["settings"] = {**ICL_SETTINGS, **changed}
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(result))
    if data is not None:
        (directory / "state.json").write_text(json.dumps({"fingerprint": {"N": 16, "data": data}, "stages": {}}))


def write_ft(directory, zero_shot=0.5, final=0.75, model="m", task="sst2", seed=0, data=None, **config):
    result = {"task": task, "model": model, "task_encoder": "lora", "num_train": 100, "num_test": 50,
              "zero_shot": {"test_accuracy": zero_shot}, "final": {"test_accuracy": final},
              "history": [{"step": 0, "test_accuracy": zero_shot}, {"step": 10, "test_accuracy": final}],
              "early_stopping": {"flip_rate_below": None, "window": 10, "stopped_at": None, "flip_rates": []},
              "settings": {"estimator": "rao_marginalized", "baseline": True, "B": 8, "N": 16, "gamma": 10.0,
                           "lr": 1e-5, "calibrate": False, "calibrate_task_encoder": False, "max_norm": 10.0,
                           "label_mode": "first", "seed": seed, "device": "cpu", "processes": 1}}
    if config:
        result["settings"]["config"] = config
    if data:
        result["data_fingerprint"] = data
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(result))


def collect(tmp_path, *roots):
    """(Markdown lines, stderr, CSV rows as dicts) of collect_results.py over ``roots``."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "collect_results.py"), *map(str, roots),
                          "--csv", str(tmp_path / "t.csv")], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "t.csv", newline="") as f:
        return out.stdout.splitlines(), out.stderr, list(csv.DictReader(f))


def table_rows(lines):
    return [line for line in lines if line.startswith("| m |")]


def test_a_run_with_other_settings_and_data_is_not_averaged_into_the_row(tmp_path):
    """Today's bug: three sst2 runs, one with N=4 on other data under the same task name, gave 33.3 ± 4.7 (n=3)."""
    write_icl(tmp_path / "runs" / "0", rounds=(0.3,), seed=0)
    write_icl(tmp_path / "runs" / "1", rounds=(0.3,), seed=1)
    write_icl(tmp_path / "runs" / "2", rounds=(0.4,), seed=2, N=4, data="e" * 16)
    lines, _, rows = collect(tmp_path, tmp_path / "runs")
    assert lines[0] == "## ICL: 3 runs in 2 rows"
    header = next(line for line in lines if line.startswith("| model"))
    assert header == "| model | task | N | zero-shot | supervised ICL | unsupervised ICL | seeds |"
    assert table_rows(lines) == ["| m | sst2 | 16 | 50.0 ± 0.0 (n=2) | 80.0 ± 0.0 (n=2) | 30.0 ± 0.0 (n=2) | 0,1 |",
                                 "| m | sst2 | 4 | 50.0 (n=1) | 80.0 (n=1) | 40.0 (n=1) | 2 |"]
    assert any(line.startswith("Same in every row: T=2, num_repeats=5,") and "protocol=clean" in line
               for line in lines)
    assert [(r["N"], r["seeds"], r["unsupervised_icl_n"]) for r in rows] == [("16", "0,1", "2"), ("4", "2", "1")]


def test_icl_and_fine_tuning_zero_shot_are_not_pooled(tmp_path):
    write_icl(tmp_path / "icl", zero_shot=0.5)
    write_ft(tmp_path / "ft", zero_shot=0.6)
    lines, _, rows = collect(tmp_path, tmp_path)
    assert "## ICL: 1 run in 1 row" in lines and "## fine-tuning: 1 run in 1 row" in lines
    assert [(r["kind"], r["zero_shot_mean"], r["zero_shot_n"], r["unsupervised_ft_mean"]) for r in rows] == [
        ("ICL", "50.0", "1", ""), ("fine-tuning", "60.0", "1", "75.0")]
    ft_header = [line for line in lines if line.startswith("| model")][1]
    assert ft_header == "| model | task | zero-shot | unsupervised FT | seeds |"


def test_protocols_never_pool(tmp_path):
    write_icl(tmp_path / "clean", rounds=(0.6,))
    write_icl(tmp_path / "original", rounds=(0.7,), protocol="original")
    write_icl(tmp_path / "older", rounds=(0.8,))  # written before the protocol was recorded
    result = json.loads((tmp_path / "older" / "results.json").read_text())
    del result["settings"]["protocol"]
    (tmp_path / "older" / "results.json").write_text(json.dumps(result))
    lines, stderr, rows = collect(tmp_path, tmp_path)
    assert sorted((r["protocol"], r["unsupervised_icl_mean"]) for r in rows) == [
        ("", "80.0"), ("clean", "60.0"), ("original", "70.0")]
    assert "protocol" in next(line for line in lines if line.startswith("| model")).split(" | ")
    assert "different data" not in stderr


def test_seeds_of_the_same_settings_pool_with_their_mean_and_sample_std(tmp_path):
    write_icl(tmp_path / "multirun" / "0", rounds=(0.6, 0.71), seed=0, device="cuda:0")
    write_icl(tmp_path / "multirun" / "1", rounds=(0.6, 0.9), seed=1, device="cpu")  # device does not count
    write_icl(tmp_path / "multirun" / "2", rounds=(0.6, 0.8), seed=2, device="vllm")
    (tmp_path / "multirun" / "broken").mkdir()
    (tmp_path / "multirun" / "broken" / "results.json").write_text("{")
    lines, stderr, rows = collect(tmp_path, tmp_path / "multirun", tmp_path / "multirun" / "1")  # 1 read once
    values = [71.0, 90.0, 80.0]
    mean, std = statistics.mean(values), statistics.stdev(values)
    assert table_rows(lines)[0].endswith(f"| {mean:.1f} ± {std:.1f} (n=3) | 0,1,2 |")
    (row,) = rows
    assert float(row["unsupervised_icl_mean"]) == pytest.approx(mean)
    assert float(row["unsupervised_icl_std"]) == pytest.approx(std) and row["unsupervised_icl_n"] == "3"
    assert "device" not in row and "skipping" in stderr and "broken" in stderr


def test_fine_tuning_pools_only_the_same_config_and_data(tmp_path):
    """Fine-tuning writes its whole config and data digest into results.json: runs that differ in a
    setting outside the headline ones (lora.r) or in their data never pool."""
    write_ft(tmp_path / "a", final=0.7, seed=0, data="a" * 16, **{"lora.r": 16})
    write_ft(tmp_path / "b", final=0.8, seed=1, data="a" * 16, **{"lora.r": 16})
    write_ft(tmp_path / "c", final=0.9, seed=2, data="a" * 16, **{"lora.r": 2})
    write_ft(tmp_path / "d", final=0.6, seed=3, data="b" * 16, **{"lora.r": 2})
    _, _, rows = collect(tmp_path, tmp_path)
    assert sorted((r["config.lora.r"], r["seeds"], r["unsupervised_ft_n"], r["data"]) for r in rows) == [
        ("16", "0,1", "2", "a" * 16), ("2", "2", "1", "a" * 16), ("2", "3", "1", "b" * 16)]


def test_same_settings_on_different_data_are_kept_apart_and_flagged(tmp_path):
    write_icl(tmp_path / "a", rounds=(0.6,), data="a" * 16, seed=0)
    write_icl(tmp_path / "b", rounds=(0.8,), data="b" * 16, seed=1)
    write_ft(tmp_path / "ft")  # records no data fingerprint: nothing to compare
    lines, stderr, rows = collect(tmp_path, tmp_path)
    assert table_rows(lines)[:2] == [
        "| m | sst2 | 50.0 (n=1) | 80.0 (n=1) | 60.0 (n=1) | 0 | data aaaaaaaa differs from another row's |",
        "| m | sst2 | 50.0 (n=1) | 80.0 (n=1) | 80.0 (n=1) | 1 | data bbbbbbbb differs from another row's |"]
    assert "different data" in stderr and str(tmp_path / "a") in stderr and str(tmp_path / "b") in stderr
    assert [r["data"] for r in rows] == ["a" * 16, "b" * 16, ""] and rows[2]["flags"] == ""


def test_runs_without_settings_pool_only_among_themselves_flagged(tmp_path):
    write_icl(tmp_path / "old0", settings=False, data=None)
    write_icl(tmp_path / "old1", settings=False, data=None)
    write_icl(tmp_path / "new", data=None)
    write_icl(tmp_path / "again", data=None)  # the same seed twice: n=2 but not two seeds' worth
    _, _, rows = collect(tmp_path, tmp_path)
    assert sorted((r["seeds"], r["zero_shot_n"], r["flags"]) for r in rows) == [
        ("0,0", "2", "seed 0 more than once"), ("?,?", "2", "no settings in results.json")]


def test_mmlu_summary_is_one_row_apart_from_its_subjects_and_from_one_subject_runs(tmp_path):
    run = tmp_path / "all"
    for subject, data in (("anatomy", "a" * 16), ("virology", "v" * 16)):
        write_icl(run / "subjects" / subject, task="mmlu", data=data, transductive=True)
    summary = {"task": "mmlu", "model": "m", "num_subjects": 2, "num_test": 20,
               "macro": {"zero_shot": 0.3, "supervised_icl": 0.5, "round_1": 0.4, "round_2": 0.45},
               "settings": {**ICL_SETTINGS, "transductive": True}}
    (run / "results.json").write_text(json.dumps(summary))
    write_icl(tmp_path / "one" / "anatomy", task="mmlu", data="a" * 16, transductive=True)
    _, stderr, rows = collect(tmp_path, tmp_path)
    assert [(r["kind"], r["unsupervised_icl_mean"], r["subjects"]) for r in rows] == [
        ("ICL", "70.0", ""), ("ICL, MMLU mean over subjects", "45.0", "2")]
    assert "different data" not in stderr


def test_generation_runs_are_their_own_kind_and_csv_numbers_parse_as_floats(tmp_path):
    pd = pytest.importorskip("pandas")
    write_icl(tmp_path / "icl0", seed=0)
    write_icl(tmp_path / "icl1", seed=1, rounds=(0.6, 0.9))
    write_ft(tmp_path / "ft")
    generation = {"task": "gsm8k", "model": "m", "num_test": 8,
                  "zero_shot": {"test_accuracy": 0.25, "answered": 8}, "supervised_icl": None,
                  "rounds": [{"round": 1, "test_accuracy": 0.5, "answered": 8, "pool_size": 8}],
                  "settings": {"N": 8, "T": 1, "num_repeats": 1, "seed": 0, "backend": "hf",
                               "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 64, "prompt_style": "cot_wei2022",
                               "template": {"zero_shot": "Q: {question}\nA:", "stop": ["\n\n"]}}}
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "results.json").write_text(json.dumps(generation))
    lines, _, _ = collect(tmp_path, tmp_path)
    assert "## generation: 1 run in 1 row" in lines
    table = pd.read_csv(tmp_path / "t.csv")
    assert list(table.kind) == ["ICL", "fine-tuning", "generation"]
    for metric in ("zero_shot", "supervised_icl", "unsupervised_icl", "unsupervised_ft"):
        assert table[f"{metric}_mean"].dtype == float and table[f"{metric}_std"].dtype == float
        assert table[f"{metric}_n"].dtype.kind == "i"
    assert table.unsupervised_icl_mean.tolist()[0] == pytest.approx(80.0)
    assert table.N.tolist()[:2] == [16, 16] and table.protocol[0] == "clean"
    assert table[table.N == 16].shape[0] == 2  # the settings are columns to filter on


def test_control_columns_pool_over_seeds_and_runs_without_controls_pool_with_them(tmp_path):
    """The controls add columns (accuracy, and the gain over the best in points) and change nothing of the method:
    a run without them pools with runs that have them, and each column counts the runs that report it."""
    for seed, (random, calibrated, gain) in enumerate([(0.55, 0.6, 0.1), (0.65, 0.5, 0.2)]):
        write_icl(tmp_path / "multirun" / str(seed), seed=seed, controls=["random_labels", "batch_calibrated"])
        path = tmp_path / "multirun" / str(seed) / "results.json"
        result = json.loads(path.read_text())
        result["controls"] = {"random_labels": {"test_accuracy": random}, "batch_calibrated": {"test_accuracy": calibrated}}
        result["gain_over_best_control"] = {"gain": gain, "control": "random_labels"}
        path.write_text(json.dumps(result))
    write_icl(tmp_path / "multirun" / "2", seed=2, controls=[])
    lines, _, rows = collect(tmp_path, tmp_path / "multirun")
    (row,) = rows
    assert row["unsupervised_icl_n"] == "3" and row["control_random_labels_n"] == "2"
    assert float(row["control_random_labels_mean"]) == pytest.approx(60.0)
    assert float(row["control_batch_calibrated_mean"]) == pytest.approx(55.0)
    assert float(row["gain_over_best_control_mean"]) == pytest.approx(15.0)
    header = next(line for line in lines if line.startswith("| model |"))
    assert "control: random labels" in header and "gain over best control (points)" in header
