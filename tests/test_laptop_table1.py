"""scripts/laptop_table1.py: its jobs are valid commands, and its table computes what its columns say."""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys

import pytest

from joint_inference.runs.config import SCHEMAS, check_settings
from tests.conftest import REPO, compose


def load_runner():
    spec = importlib.util.spec_from_file_location("laptop_table1", REPO / "scripts" / "laptop_table1.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


runner = load_runner()


@pytest.mark.parametrize("job", runner.all_jobs(), ids=lambda job: job.name)
def test_every_job_is_a_command_that_passes_the_settings_check(job, tmp_path):
    command = job.command(tmp_path)
    script = command[1].rsplit("/", 1)[-1].removesuffix(".py")
    overrides = [f"output_dir={tmp_path}", *(o for o in command[2:] if not o.startswith("hydra."))]
    check_settings(compose(script, overrides), SCHEMAS[script])


def test_the_jobs_cover_the_issue():
    """Every classification task with Gemma, ICL and fine-tuning, on two seeds; MMLU; SmolLM2 on 3 tasks."""
    names = {job.name for job in runner.all_jobs()}
    for task in runner.TASKS:
        for kind in ("icl", "uft"):
            assert {f"{kind}/gemma3_270m/{task}/seed{seed}" for seed in runner.SEEDS} <= names
    assert "icl/gemma3_270m/mmlu/seed0" in names
    assert sum(name.startswith("icl/smollm2_135m/") for name in names) >= 3
    assert len(names) == len(runner.all_jobs())  # no job twice


def test_only_orders_the_jobs_as_the_patterns_say():
    jobs = runner.selected_jobs(["uft/*/rte/seed0", "icl/gemma3_270m/sst2/*"])
    assert [job.name for job in jobs] == ["uft/gemma3_270m/rte/seed0", "icl/gemma3_270m/sst2/seed0",
                                          "icl/gemma3_270m/sst2/seed1"]
    with pytest.raises(SystemExit, match="no job matches"):
        runner.selected_jobs(["icl/nope/*"])


def write_results(root, name, result):
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(result))


def icl_result(zero_shot, supervised, rounds):
    diagnostics = {"flip_fraction": 0.25, "vote_agreement": 0.5, "class_distribution": [0.4, 0.6]}
    return {"zero_shot": {"test_accuracy": zero_shot}, "supervised_icl": {"test_accuracy": supervised},
            "rounds": [{"test_accuracy": a, "diagnostics": diagnostics} for a in rounds],
            "settings": {"labels": ["negative", "positive"]}, "num_test": 100, "timing": {"seconds": 60.0}}


def test_the_table_is_mean_and_std_over_seeds_and_the_reward_picks_the_step(tmp_path):
    write_results(tmp_path, "icl/gemma3_270m/sst2/seed0", icl_result(0.5, 0.6, [0.7, 0.9, 0.8]))
    write_results(tmp_path, "icl/gemma3_270m/sst2/seed1", icl_result(0.5, 0.8, [0.75, 0.6, 0.65]))
    history = [{"step": 10, "reward_argmax": -2.0, "test_accuracy": 0.7},
               {"step": 20, "reward_argmax": -1.0, "test_accuracy": 0.6},  # the highest reward
               {"step": 30, "reward_argmax": None, "test_accuracy": 0.95},  # no reward: never chosen
               {"step": 40, "reward_argmax": -1.5, "test_accuracy": 0.9}]
    write_results(tmp_path, "uft/gemma3_270m/sst2/seed0",
                  {"zero_shot": {"test_accuracy": 0.5}, "final": {"test_accuracy": 0.9}, "history": history,
                   "num_test": 100, "timing": {"seconds": 30.0, "train_seconds": 20.0}})
    runs = runner.collect(tmp_path)
    assert runs["uft/gemma3_270m/sst2/seed0"]["uft_best_by_reward"] == pytest.approx(60.0)
    assert runs["uft/gemma3_270m/sst2/seed0"]["uft_best_step"] == 20

    row = next(line for line in runner.markdown(runs).splitlines() if "| sst2 |" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    columns = ["model", "task", "n", "zero", "sup", "best", "final", "uft", "uft_best", "diag", "seeds"]
    cell = dict(zip(columns, cells))
    expect = lambda values: f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"  # noqa: E731
    assert cell["sup"] == expect([60, 80])
    assert cell["best"] == expect([90, 75])  # the best round of each seed, then over seeds
    assert cell["final"] == expect([80, 65])
    assert cell["uft"] == "90.0 (1 seed)" and cell["uft_best"] == "60.0 (1 seed)"
    assert cell["diag"] == "25%, 50%, 40/60; 25%, 50%, 40/60" and cell["n"] == "100"
    assert cell["seeds"] == "icl 0,1; uft 0"

    runner.write(runs, tmp_path / "table.json", started=0.0)
    report = json.loads((tmp_path / "table.json").read_text())
    assert report["seconds_all_runs"] == pytest.approx(150.0) and report["jobs_done"] == 3

    resumed = {"timing": {"seconds": 10.0, "train_seconds": 25.0}}  # its last invocation trained 5 of 25 s
    uft = runner.Job("uft", "gemma3_270m", "sst2", 0)
    assert runner.figures(uft, {**json.loads((tmp_path / uft.name / "results.json").read_text()),
                                **resumed})["seconds"] == 25.0
    assert (tmp_path / "table.md").read_text() == runner.markdown(runs)
