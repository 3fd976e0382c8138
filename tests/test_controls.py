"""Controls (methods/controls.py): each uses its method's draws and calls, batch calibration and the paired
interval against slow references written here, and the run's reports."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from joint_inference.core.errors import ConfigError
from joint_inference.methods import controls as ctl
from joint_inference.methods import uicl
from tests.conftest import compose


def icl_config(model_dir, data_root, out_dir, *extra):
    return compose("unsupervised_icl_llm", [
        f"model.pretrained={model_dir}", "model.embedded=null", "model.name=tiny_llama", "dataset=sst2",
        f"dataset.data_root={data_root}", "dataset.num_examples=24", "N=3", "T=2", "num_repeats=3",
        "device=cpu", "forward_batch_size=5", "progress=false", "save_predictions=true", f"output_dir={out_dir}",
        *extra])


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("controls, kind, protocol, message", [
    (["majority_vote"], "classification", "clean", (r"'majority_vote' does not apply here \(classification tasks "
                                                    r"take random_labels, batch_calibrated\)")),
    (["random_labels"], "generation", "clean", (r"'random_labels' does not apply here \(generation tasks take "
                                                r"majority_vote\)")),
    (["majority_vote"], "mmmu", "clean", r"'majority_vote' does not apply here \(mmmu tasks take none yet\)"),
    (["random_labels"], "classification", "original", r"protocol=original: the original release runs no controls"),
    (["batch_calibrated", "batch_calibrated"], "classification", "clean", "names a control twice"),
])
def test_a_control_that_does_not_apply_is_refused(controls, kind, protocol, message):
    with pytest.raises(ConfigError, match=message):
        ctl.check_controls(controls, kind, protocol)


def test_a_refused_control_stops_the_run_before_any_work(tiny_llama_dir, tiny_sst2_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    with pytest.raises(ConfigError, match="majority_vote"):
        run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", "controls=[majority_vote]"))
    assert not (tmp_path / "run" / "state.json").exists()


# ------------------------------------------------------------------------ same draws, same calls
def recorded_calls(monkeypatch) -> dict[str, list]:
    """Every prompt the scorer is asked for, by the stage that asks (its progress label): (demonstrations'
    token ids, their shown labels, the query's token ids)."""
    from joint_inference.scoring.scorer import Scorer

    calls: dict[str, list] = {}
    label_logprobs = Scorer.label_logprobs

    def recording(self, prompts, labels, read="query", desc=None):
        calls.setdefault(desc, []).extend((tuple(ex.prefix for ex in p[:-1]), tuple(lab), p[-1].prefix)
                                          for p, lab in zip(prompts, labels))
        return label_logprobs(self, prompts, labels, read, desc)

    monkeypatch.setattr(Scorer, "label_logprobs", recording)
    return calls


def test_random_labels_is_round_1_with_only_the_shown_labels_changed(tiny_llama_dir, tiny_sst2_root, tmp_path,
                                                                      monkeypatch):
    """The control asks the scorer for round 1's test prompts: the same demonstrations, in the same order, for
    the same queries, as many, each demonstration shown with the class the random labelling gave its pool
    example instead of its pseudo-label."""
    from joint_inference.runs.root import run_icl as run
    from tests.conftest import settings_of, task_data

    calls = recorded_calls(monkeypatch)
    cfg = icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", "controls=[random_labels]", "T=1")
    results = run(cfg)
    control, round_1 = calls["control: random labels [test]"], calls["round 1/1 [test]"]
    assert len(control) == results["num_test"] * results["settings"]["num_repeats"]
    assert [(demos, query) for demos, _, query in control] == [(demos, query) for demos, _, query in round_1]

    from joint_inference.models.language import load_tokenizer
    from joint_inference.runs.root import prompt_encoder

    settings = settings_of(cfg)
    pool = prompt_encoder(settings, load_tokenizer(settings.model)).encode_all(task_data(cfg).train)
    index = {ex.prefix: i for i, ex in enumerate(pool)}
    stages = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]
    pseudo = np.asarray(stages["zero_shot/train"]["train"])
    random = ctl.random_labelling(len(pool), 2, settings.seed)
    assert (random != pseudo).any() and (random == pseudo).any()  # neither the pseudo-labels nor their opposite
    for (demos, shown, _), (_, round_labels, _) in zip(control, round_1):
        assert list(round_labels) == pseudo[[index[d] for d in demos]].tolist()
        assert list(shown) == random[[index[d] for d in demos]].tolist()


def test_random_labels_with_the_pseudo_labels_shown_is_round_1_exactly(tiny_llama_dir, tiny_sst2_root, tmp_path,
                                                                        monkeypatch):
    """The pseudo-labels shown in place of random ones: the control's votes and predictions are round 1's."""
    from joint_inference.runs.root import run_icl as run

    cfg = icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", "controls=[random_labels]", "T=1")
    first = run(cfg)
    stages = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]
    monkeypatch.setattr(uicl, "random_labelling", lambda size, k, seed: np.asarray(stages["zero_shot/train"]["train"]))
    again = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "identity", "controls=[random_labels]", "T=1"))
    identity = json.loads((tmp_path / "identity" / "state.json").read_text())["stages"]
    for key in ("test", "test_votes"):
        assert identity["control_random_labels/test"][key] == identity["round_1/test"][key]
    assert again["controls"]["random_labels"]["test_accuracy"] == again["rounds"][0]["test_accuracy"]
    assert first["rounds"] == again["rounds"]  # the control changes nothing of the method


def test_controls_join_a_finished_run_at_their_own_cost(tiny_llama_dir, tiny_sst2_root, tmp_path, monkeypatch):
    """Controls asked of a finished run directory score their prompts only (the method's stages are reused);
    batch calibration scores none. A state file from before the zero-shot log-probs were kept gets them
    scored again, and the same predictions as a run that kept them."""
    from joint_inference.runs.root import run_icl as run

    plain = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run"))
    assert "controls" not in plain
    calls = recorded_calls(monkeypatch)
    both = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run",
                          "controls=[random_labels,batch_calibrated]"))
    assert list(calls) == ["control: random labels [test]"]
    votes = both["settings"]["num_repeats"]
    assert both["timing"]["prompts_scored"] - plain["timing"]["prompts_scored"] == both["num_test"] * votes
    assert both["rounds"] == plain["rounds"] and set(both["controls"]) == {"random_labels", "batch_calibrated"}

    state_path = tmp_path / "run" / "state.json"
    state = json.loads(state_path.read_text())
    for key in ("zero_shot/test", "zero_shot/train"):
        state["stages"][key] = {k: v for k, v in state["stages"][key].items() if not k.endswith("_logprobs")}
    del state["stages"]["control_batch_calibrated/test"]
    state_path.write_text(json.dumps(state))
    calls.clear()
    old = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", "controls=[random_labels,batch_calibrated]"))
    assert sorted(calls) == ["zero-shot [test]", "zero-shot [train]"]
    assert old["controls"] == both["controls"]


# ------------------------------------------------------------------------------- batch calibration
def test_batch_calibration_against_a_slow_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 3)) + np.array([2.0, 0.0, -1.0])  # a bias toward class 0
    logprobs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    pool = logprobs[:5]
    prior = [sum(np.exp(pool[i][k]) for i in range(5)) / 5 for k in range(3)]
    want = [max(range(3), key=lambda k: np.exp(logprobs[q][k]) - prior[k]) for q in range(7)]
    assert ctl.batch_calibrated(logprobs, pool).tolist() == want
    # a known value: every example leans to class 0 by the same amount; calibration removes the lean
    lean = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.85, 0.15]]))  # the pool's mean: 0.78, 0.22
    assert ctl.batch_calibrated(lean, lean).tolist() == [0, 1, 0]


# ------------------------------------------------------------------------------- the paired interval
def test_paired_gain_against_the_exact_bootstrap_distribution():
    """Six questions: the exact bootstrap distribution of the mean paired difference (all 6^6 resamples,
    enumerated) against the 10,000 drawn: the same 2.5% and 97.5% quantiles to within one step of 1/6."""
    gold = np.array([0, 1, 0, 1, 1, 0])
    method = np.array([0, 1, 0, 1, 0, 0])  # 5 right
    control = np.array([1, 1, 0, 0, 0, 0])  # 3 right
    got = ctl.paired_gain(method == gold, control == gold)
    assert got["gain"] == pytest.approx(2 / 6)
    assert (got["method_only_right"], got["control_only_right"]) == (2, 0)
    difference = (method == gold).astype(float) - (control == gold)
    exact = np.sort([difference[list(resample)].mean() for resample in itertools.product(range(6), repeat=6)])
    low, high = np.quantile(exact, [0.025, 0.975])
    assert abs(got["low"] - low) <= 1 / 6 + 1e-9 and abs(got["high"] - high) <= 1 / 6 + 1e-9
    assert got["low"] >= 0  # the control is never right alone: no resample shows it ahead
    same = ctl.paired_gain(method == gold, method == gold)
    assert (same["gain"], same["low"], same["high"]) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------ reports
def test_the_reports_show_the_controls_and_the_gain_over_the_best(tiny_llama_dir, tiny_sst2_root, tmp_path):
    from joint_inference.runs.root import run_icl as run

    results = run(icl_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run",
                             "controls=[random_labels,batch_calibrated]"))
    controls = results["controls"]
    best = max(controls, key=lambda name: controls[name]["test_accuracy"])
    gain = results["gain_over_best_control"]
    assert gain["control"] == best and gain["method"] == "round 2"
    assert gain["gain"] == pytest.approx(results["rounds"][-1]["test_accuracy"] - controls[best]["test_accuracy"])
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| control: random labels (round 1's draws) |" in table
    assert "| control: batch-calibrated zero-shot |" in table
    assert f"{100 * gain['gain']:+.1f} points on the same {results['num_test']} test questions" in table
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    assert np.mean([r["controls"]["batch_calibrated"] == r["label"] for r in test]) == pytest.approx(
        controls["batch_calibrated"]["test_accuracy"])
    assert results["settings"]["controls"] == ["random_labels", "batch_calibrated"]


# ------------------------------------------------------------------------------------------ generation
def test_majority_vote_samples_the_zero_shot_prompt_as_often_as_the_method_samples(tmp_path, monkeypatch):
    """GSM8K, N=3, T=3, 3 votes: the method samples 3 zero-shot answers and 3 per round per question (12);
    the control samples the zero-shot prompt 12 times and keeps the most frequent answer."""
    from tests.test_uicl_generation import (
        GOLD,
        QUESTIONS,
        ScriptedGenerator,
        query_of,
        run_scripted,
        scripted_config,
        write_jsonl,
    )

    rows = [{"question": q, "answer": f"Add them.\n#### {g}"} for q, g in zip(QUESTIONS, GOLD)]
    write_jsonl(tmp_path / "data" / "gsm8k" / "test.jsonl", rows)

    class Votes(ScriptedGenerator):
        """The control's call (the sixth) answers question 0 wrong in 7 of its 12 samples, the others right."""

        def generate(self, prompts, num_samples=1, seed=0):
            out = super().generate(prompts, num_samples, seed)
            if len(self.calls) == 6:
                out = [[s.replace(f"is {GOLD[0]}.", "is 999.") if i < 7 and query_of(p) == 0 else s
                        for i, s in enumerate(samples)] for p, samples in zip(prompts, out)]
            return out

    gen = Votes(lambda stage, q, p: GOLD[q] if q != 5 or stage == 5 else None)
    results = run_scripted(monkeypatch, scripted_config(tmp_path / "data", tmp_path / "run",
                                                        "controls=[majority_vote]"), gen)
    assert gen.samples == [3, 3, 1, 1, 1, 12]
    assert gen.calls[-1] == gen.calls[0]  # the zero-shot prompts, one per question
    control = results["controls"]["majority_vote"]
    assert control["samples_per_question"] == 3 + 3 * 3
    assert control["test_accuracy"] == pytest.approx(5 / 6)  # q0 outvoted to 999; q5 right
    assert [r["test_accuracy"] for r in results["rounds"]] == pytest.approx([5 / 6] * 3)  # q5 never parses
    gain = results["gain_over_best_control"]
    assert (gain["gain"], gain["method_only_right"], gain["control_only_right"]) == (0.0, 1, 1)
    rows = [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    assert rows[0]["controls"]["majority_vote"]["answer"] == 999.0 and rows[5]["controls"]["majority_vote"]["correct"]


# ------------------------------------------------------------------------------------------ fine-tuning
def ft_config(model_dir, data_root, out_dir, *extra):
    return compose("unsupervised_ft_llm", [
        f"output_dir={out_dir}", f"model.pretrained={model_dir}", "model.embedded=null",
        f"dataset.data_root={data_root}",
        "device=cpu", "batch_size=2", "N=4", "num_iterations=4", "eval_freq=2", "ckpt_freq=2", "progress=false",
        "optimization.lr=1e-2", "lora.r=4", *extra])


def test_fine_tuning_random_labels_trains_the_same_way_from_the_same_start_with_uniform_labels(
        tiny_llama_dir, tiny_sst2_root, tmp_path, monkeypatch):
    """The control's steps draw the same pool batches from the same generator, start from the method's
    initial adapters, and read uniformly random labels; forced to draw the task encoder's labels as the method
    does, it ends with the method's weights exactly. The method's own results are those of a run without it."""
    import torch

    from joint_inference.methods import finetune
    from joint_inference.runs.root import run_finetuning as run

    plain = run(ft_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "plain"))
    steps, step = [], finetune.train_step

    def recording(encoder, reward, idx, *args, random_labels=False, **kwargs):
        steps.append((idx.clone(), random_labels))
        return step(encoder, reward, idx, *args, random_labels=random_labels, **kwargs)

    monkeypatch.setattr(finetune, "train_step", recording)
    both = run(ft_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", "controls=[random_labels]"))
    assert both["history"] == plain["history"] and both["final"] == plain["final"]
    assert [r for _, r in steps] == [False] * 4 + [True] * 4
    method_batches, control_batches = [i for i, _ in steps[:4]], [i for i, _ in steps[4:]]
    assert not all(torch.equal(a, b) for a, b in zip(method_batches, control_batches))  # randint moves the stream
    assert method_batches[0].tolist() == control_batches[0].tolist()  # the first batch: the same generator, seed
    control = both["controls"]["random_labels"]
    assert [h["step"] for h in control["history"]] == [0, 2, 4]
    assert control["history"][0] == both["history"][0]  # the same start: the zero-shot evaluation
    assert (tmp_path / "run" / "controls" / "random_labels" / "checkpoint.pt").exists()
    table = (tmp_path / "run" / "results.md").read_text()
    assert "Control, the same training with random labels" in table and "against the best control" in table

    # with the task encoder's own labels in place of random ones, the control is the method again
    monkeypatch.setattr(finetune, "train_step", lambda *a, random_labels=False, **k: step(*a, **k))
    run(ft_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "identity", "controls=[random_labels]"))
    method = torch.load(tmp_path / "identity" / "checkpoint.pt", weights_only=True)["trainable"]
    twin = torch.load(tmp_path / "identity" / "controls" / "random_labels" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(method[k], v) for k, v in twin["trainable"].items())


def test_fine_tuning_controls_are_refused_where_they_do_not_apply(tiny_llama_dir, tiny_sst2_root, tmp_path):
    from joint_inference.runs.root import run_finetuning as run

    with pytest.raises(ConfigError, match=r"'batch_calibrated' does not apply here \(fine-tuning tasks take "
                                          r"random_labels\)"):
        run(ft_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "run", "controls=[batch_calibrated]"))


def test_the_fine_tuning_dry_run_counts_the_controls_second_training(tiny_llama_dir, tiny_sst2_root, tmp_path):
    from joint_inference.runs.root import run_finetuning as run

    plain = run(ft_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "a", "dry_run=true"))["dry_run"]
    both = run(ft_config(tiny_llama_dir, tiny_sst2_root, tmp_path / "b", "dry_run=true",
                         "controls=[random_labels]"))["dry_run"]
    assert [s["stage"] for s in both["stages"][2:]] == ["control: random labels, the same evaluations",
                                                         "control: random labels, the same training"]
    assert both["total"]["prompts"] == 2 * plain["total"]["prompts"]
    assert both["total"]["tokens"] == 2 * plain["total"]["tokens"]
