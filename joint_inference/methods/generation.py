"""Unsupervised ICL for generative reasoning tasks (docs/protocol.md §6, paper Table 2): GSM8K, MMLU-Pro.
The sibling of ``uicl.py`` (classification); the models that write the responses are in ``generators.py``.

* Round 0: every question answered zero-shot with chain of thought, ``num_repeats`` samples each,
  majority vote over the extracted final answers.
* Baseline: supervised few-shot prompts with written exemplars (reported, never used by the rounds):
  for GSM8K the published exemplars of the model family's prompt style (``prompt_style=``), in order;
  for MMLU-Pro ``N`` drawn at random per question from its category's validation examples.
* Round t = 1..T: for each question, ``num_repeats`` prompts of ``N`` demonstrations drawn
  without replacement from the *other* questions with their round t-1 responses (unparseable ones,
  and choices read only from a last letter, are not in the pool; with a category field, only
  questions of the same category); majority vote; the winners become the next round's pool.

``protocol=original`` gives the original release's behaviour where ours deliberately differs
(docs/protocol.md §8): a question may be among its own demonstrations, answers are read with the
original's parsers (and an MMLU-Pro response demonstrates if it contains "answer is"), vote ties go
to the answer seen first, zero-shot and the baseline are sampled once, and generation stops only
where the original's does.

A GSM8K response is cut right after its first "The (final) answer is N" (as in the original release);
the cut text is what is scored, shown as a demonstration and written to answers.jsonl.

Random draws are keyed by (seed, stage, question), so a question's demonstrations do not depend on
the order of processing or on resumption. Each stage is saved when it finishes (``answer_stage``, which
MMMU's runs use too).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError
from ..core.settings import GenerationSettings, GenerationTemplate, TextICLSettings
from ..core.utils import fingerprint_digest, resolve_device, seed_everything
from ..data.hub import load_split
from ..models.language import compute_dtype, dtype_before_recorded
from ..reporting.results import RunState, write_jsonl, write_results
from ..scoring.generators import SamplingSettings
from .answers import (
    cut_after_answer,
    extract_choice,
    extract_number,
    gold_number,
    majority_vote,
    numbers_equal,
    original_parser_choice,
    original_parser_number,
    read_choice,
    same_answer,
)
from .controls import paired_gain

log = logging.getLogger(__name__)
LETTERS = "ABCDEFGHIJ"


# ----------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class CotFormat:
    """How questions and responses become prompts (a ``template/`` config of a generation task).

    zero-shot prompt:  zero_shot, filled with the query's fields
    few-shot prompt:   instruction + (query + response + separator for each demonstration) + query,
                       the supervised baseline's with supervised_instruction instead of instruction
    A response is what the model wrote after the query, verbatim: "Q: {question}\nA:" + " It is 5...".
    """

    instruction: str  # may read the query's fields, e.g. {category}
    supervised_instruction: str
    query: str  # one question up to where its response starts, e.g. "Q: {question}\nA:"
    separator: str  # after each demonstration
    zero_shot: str
    stop: tuple[str, ...]  # generation ends before these: where a next question would start
    stop_after: tuple[str, ...]  # generation ends right after these (kept), e.g. "answer is (C)"

    FIELDS = ("instruction", "supervised_instruction", "query", "separator", "zero_shot", "stop")

    @classmethod
    def from_template(cls, t: GenerationTemplate, protocol: str = "clean") -> "CotFormat":
        """The template's prompts; its ``stop`` strings are the original's, ``stop_clean`` ones are added
        under ``protocol=clean`` (ours: a response also ends where a small model starts a next question)."""
        stop = [*(t.stop or ()), *((t.stop_clean or ()) if protocol == "clean" else ())]
        return cls(t.instruction, t.supervised_instruction, t.query, t.separator, t.zero_shot, tuple(stop),
                   tuple(t.stop_after or ()))

    def zero_shot_prompt(self, row: dict) -> str:
        return _fill(self.zero_shot, row)

    def few_shot_prompt(self, row: dict, demos: list[tuple[dict, str]], supervised: bool = False) -> str:
        head = self.supervised_instruction if supervised else self.instruction
        shots = "".join(_fill(self.query, r) + response + self.separator for r, response in demos)
        return _fill(head, row) + shots + _fill(self.query, row)


def _fill(text: str, row: dict) -> str:
    try:
        return text.format(**row)
    except (KeyError, IndexError) as err:
        raise ConfigError(f"template needs field {err} that the rows lack (fields: {sorted(row)}); "
                          "pick a matching template= (literal braces are written {{ }})") from None


# ----------------------------------------------------------------------------- data


@dataclass
class GenerativeTask:
    """The questions (dataset rows), their gold answers, and what the baseline demonstrates."""

    rows: list[dict]
    sources: list[str]  # "split[row]" of each question, to name it
    gold: list  # a float (number tasks) or a letter (choice tasks) per question
    answer_type: str  # number | choice
    categories: list[str] | None  # demonstrations come from the same category; accuracy per category
    exemplars: list[tuple[dict, str, str | None]] | None  # (row, written response, category): the baseline's
    draw_exemplars: bool = False  # the baseline draws n_shots of them per question (a pool), else the first n_shots
    protocol: str = "clean"  # original: the original release's parsers, pool rule, self-demonstrations, vote ties

    def read(self, q: int, text: str) -> tuple[str, object]:
        """The response as kept (GSM8K: cut after its first final-answer statement) and its answer, or None."""
        original = self.protocol == "original"
        if self.answer_type == "number":
            kept = cut_after_answer(text)
            return kept, (original_parser_number if original else extract_number)(kept)
        return text, original_parser_choice(text) if original else read_choice(text, self._letters(q))

    def states_answer(self, q: int, response: str) -> bool:
        """Whether a parseable response may demonstrate: a choice must be stated ("the answer is (C)", "Answer: C",
        boxed), not guessed by the last-letter fallback; the original keeps responses that contain "answer is"."""
        if self.answer_type == "number":
            return True
        if self.protocol == "original":
            return "answer is" in response
        return extract_choice(response, self._letters(q)) is not None

    def _letters(self, q: int) -> str:
        return LETTERS[:len(self.rows[q]["options"])]

    def correct(self, answers: list) -> list[bool]:
        if self.answer_type == "number":
            return [numbers_equal(a, g) for a, g in zip(answers, self.gold)]
        return [a == g for a, g in zip(answers, self.gold)]


def _with_options(row: dict, dataset) -> dict:
    """Choice tasks: the option list as lettered lines, ``{options_text}`` in templates."""
    field = dataset.options_field
    if not field:
        return row
    options = list(row[field])
    if not 0 < len(options) <= len(LETTERS):
        raise ConfigError(f"a row of {dataset.name!r} has {len(options)} options; 1 to {len(LETTERS)} are supported")
    return {**row, "options": options, "options_text": "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))}


def _gold(row: dict, dataset, source: str):
    raw = row.get(dataset.answer_field)
    try:
        if dataset.answer_type == "number":
            return gold_number(raw)
        if dataset.answer_type == "choice" and isinstance(raw, str) and raw.strip() in LETTERS[:len(row["options"])]:
            return raw.strip()
    except ValueError:
        pass
    if dataset.answer_type not in ("number", "choice"):
        raise ConfigError(f"dataset.answer_type must be number or choice, got {dataset.answer_type!r}")
    expected = ("text ending in '#### <number>'" if dataset.answer_type == "number"
                else f"a letter among the row's {len(row.get('options', []))} options")
    question = str(row.get(dataset.question_field, ""))[:80]
    raise ConfigError(f"row {source} of {dataset.name!r} has no gold answer in the expected format: field "
                      f"{dataset.answer_field!r} is {str(raw)[-120:]!r}, expected {expected} (question: {question!r})")


def _exemplars(dataset) -> list[tuple[dict, str, str | None]] | None:
    """Demonstrations of the supervised baseline: listed in the config, or another split's written CoT; None if
    absent. Responses are kept verbatim (they follow the query with the spacing their source has), less the
    ``remove`` text wherever it occurs, as the original deletes "A: Let's think step by step." from MMLU-Pro's."""
    ex = dataset.exemplars
    if ex is None:
        return None
    if ex.source == "inline":
        items = ex.items
        if not items or not all(isinstance(i, dict) and isinstance(i.get("response"), str) for i in items):
            raise ConfigError("dataset.exemplars.items must list exemplars, each with the row's fields and a "
                              "response, e.g. items: ${prompt_style.exemplars}")
        return [({k: v for k, v in i.items() if k != "response"}, i["response"], None) for i in items]
    try:
        rows = load_split(dataset, ex.split).to_list()
    except ConfigError as err:
        log.warning("no supervised baseline: the exemplar split %r is not available (%s)", ex.split, err)
        return None
    remove, category = ex.remove or "", dataset.category_field
    return [(_with_options(r, dataset), r[ex.response_field].replace(remove, ""),
             str(r[category]) if category else None) for r in rows]


def load_generative_task(dataset: GenerationSettings, protocol: str = "clean") -> GenerativeTask:
    """The questions of ``dataset.source_splits`` (a seeded subset of ``num_examples``), gold answers checked.

    The supervised baseline's exemplars from another split are a pool it draws from (MMLU-Pro's validation
    examples, as the original draws them); exemplars listed in the config are a published prompt, used as listed.
    """
    rows, sources = [], []
    for split in dataset.source_splits:
        part = load_split(dataset, split).to_list()
        rows += part
        sources += [f"{split}[{i}]" for i in range(len(part))]
    if not rows:
        raise ConfigError(f"dataset {dataset.name!r} has no rows in splits {list(dataset.source_splits)}")
    if dataset.num_examples is not None and dataset.num_examples < len(rows):
        keep = np.sort(np.random.default_rng(dataset.sample_seed).choice(len(rows), dataset.num_examples, replace=False))
        rows, sources = [rows[i] for i in keep], [sources[i] for i in keep]
    rows = [_with_options(r, dataset) for r in rows]
    categories = [str(r[dataset.category_field]) for r in rows] if dataset.category_field else None
    return GenerativeTask(rows=rows, sources=sources, gold=[_gold(r, dataset, s) for r, s in zip(rows, sources)],
                          answer_type=dataset.answer_type, categories=categories, exemplars=_exemplars(dataset),
                          draw_exemplars=dataset.exemplars is not None and dataset.exemplars.source == "split",
                          protocol=protocol)


# ----------------------------------------------------------------------------- rounds


def question_rng(key: tuple[int, ...], q: int, use: int) -> np.random.Generator:
    """The random stream of question ``q`` in a stage: use 0 draws demonstrations, use 1 breaks vote ties."""
    return np.random.default_rng([*key, q, use])


def draw(items: list, n: int, rng: np.random.Generator) -> list:
    """``n`` of ``items`` (all if fewer) at random, without replacement, in random order, as the original's
    ``np.random.choice(items, n, replace=False)`` (which fails where we take what there is)."""
    return [items[i] for i in rng.permutation(len(items))[:n]]


def answer(generator, task: GenerativeTask, prompts: list[list[str]], num_samples: int, key: tuple[int, ...]) -> dict:
    """Generate for every prompt, vote per question; the stage's answers and one winning response each.

    ``prompts[q]`` are question q's prompts, each sampled ``num_samples`` times. Vote ties are broken at
    random, or go to the answer seen first (``protocol=original``). The response kept (as ``task.read`` keeps
    it) is a random one among those whose answer won (any response when none parses).
    """
    outputs = iter(generator.generate([p for ps in prompts for p in ps], num_samples,
                                      seed=int(np.random.default_rng(key).integers(2**31))))
    answers, responses = [], []
    for q, ps in enumerate(prompts):
        samples, extracted = zip(*(task.read(q, text) for _ in ps for text in next(outputs)))
        rng = question_rng(key, q, 1)
        winner = majority_vote(list(extracted), None if task.protocol == "original" else rng)
        backing = [s for s, a in zip(samples, extracted) if a is not None and same_answer(a, winner)] or samples
        answers.append(winner)
        responses.append(backing[int(rng.integers(len(backing)))])
    return {"answers": answers, "responses": responses}


def answer_stage(state: RunState, load_generator: Callable, task, name: str, build: Callable[[], tuple[list, dict]],
                 num_samples: int, key: tuple[int, ...], annotate: Callable[[dict], dict] | None = None) -> dict:
    """Stage ``name`` of a generation run (GSM8K, MMLU-Pro, an MMMU subject), as a previous start saved it, else
    answered and saved, so an interrupted run redoes only its unfinished stages.

    ``build()`` gives the prompts (see :func:`answer`) and fields to save beside the answers, ``annotate(result)``
    more fields read from the answers. ``load_generator()`` is called only for a stage left to answer, so a run
    with every stage saved loads no model.
    """
    if name not in state:
        generator = load_generator()
        start = time.perf_counter()
        prompts, extra = build()
        log.info("%s: %d questions, %d prompts", name, len(prompts), sum(map(len, prompts)))
        result = {**answer(generator, task, prompts, num_samples, key), **extra}
        result.update(annotate(result) if annotate else {})
        state.finish(name, result, time.perf_counter() - start, sum(map(len, prompts)))
    log.info("%s: accuracy %.4f", name, np.mean(task.correct(state[name]["answers"])))
    return state[name]


def round_prompts(task: GenerativeTask, fmt: CotFormat, previous: dict, n_shots: int, num_repeats: int,
                  key: tuple[int, ...], name: str) -> tuple[list[list[str]], dict]:
    """``num_repeats`` n-shot prompts per question from the other questions' responses that state an answer.

    Each prompt draws its own demonstrations. Under ``protocol=original`` a question may be among its own,
    as in the original release, which draws from the whole pool.

    Returns the prompts and ``{"pool_size": ...}``. Where fewer than ``N`` demonstrations are
    available, the prompts use what there is and one warning says how many remain.
    """
    pool = [j for j, (a, response) in enumerate(zip(previous["answers"], previous["responses"]))
            if a is not None and task.states_answer(j, response)]
    prompts, short = [], []
    for q, row in enumerate(task.rows):
        candidates = [j for j in pool if (j != q or task.protocol == "original")
                      and (task.categories is None or task.categories[j] == task.categories[q])]
        if len(candidates) < n_shots:
            short.append(len(candidates))
        rng = question_rng(key, q, 0)
        prompts.append([fmt.few_shot_prompt(row, [(task.rows[j], previous["responses"][j])
                                                  for j in draw(candidates, n_shots, rng)])
                        for _ in range(num_repeats)])
    if short:
        log.warning("%s: N=%d, but only %s parseable responses of other questions remain for %d of %d "
                    "questions; their prompts use that many demonstrations", name, n_shots,
                    min(short) if min(short) == max(short) else f"{min(short)}-{max(short)}", len(short), len(prompts))
    return prompts, {"pool_size": len(pool)}


def supervised_prompts(task: GenerativeTask, fmt: CotFormat, n_shots: int, key: tuple[int, ...]) -> list[list[str]]:
    """One prompt per question: ``N`` exemplars of the question's category, drawn at random for each
    question where the exemplars are a pool (``task.draw_exemplars``), else the first ``N`` in order."""
    prompts, fewest = [], n_shots
    for q, row in enumerate(task.rows):
        demos = [(r, resp) for r, resp, c in task.exemplars if task.categories is None or c == task.categories[q]]
        demos = draw(demos, n_shots, question_rng(key, q, 0)) if task.draw_exemplars else demos[:n_shots]
        fewest = min(fewest, len(demos))
        prompts.append([fmt.few_shot_prompt(row, demos, supervised=True)])
    if fewest < n_shots:
        log.warning("supervised baseline: N=%d, but some questions have only %d exemplars", n_shots, fewest)
    return prompts


def summary(task: GenerativeTask, stage: dict) -> dict:
    """Accuracy of a stage, with the comparison to the original's parser (numbers) or per category (categories)."""
    correct = task.correct(stage["answers"])
    out = {"test_accuracy": float(np.mean(correct)), "answered": sum(a is not None for a in stage["answers"])}
    if task.answer_type == "number":
        # What the original release's parser reads from the same (kept) responses, and where we read otherwise.
        original = [original_parser_number(r) for r in stage["responses"]]
        out["original_parser_accuracy"] = float(np.mean([numbers_equal(o, g) for o, g in zip(original, task.gold)]))
        out["original_parser_differs"] = sum(not same_answer(a, o) for a, o in zip(stage["answers"], original))
    if task.categories is not None:
        # The original runs and reports each category on its own; their mean weighs every category alike.
        out["per_category"] = {c: float(np.mean([ok for ok, cq in zip(correct, task.categories) if cq == c]))
                               for c in sorted(set(task.categories))}
        out["category_mean_accuracy"] = float(np.mean(list(out["per_category"].values())))
    return out


# ----------------------------------------------------------------------------- the run


def sampling_settings(run: TextICLSettings, fmt: CotFormat | None = None) -> SamplingSettings:
    """How a run's responses are sampled: its decoding settings, cut at the template's stop strings."""
    stops = (fmt.stop, fmt.stop_after) if fmt else ()
    return SamplingSettings(run.max_new_tokens, run.temperature, run.top_p, *stops)


def run_generation(run: TextICLSettings, task: GenerativeTask, fmt: CotFormat, load_generator: Callable) -> dict:
    """Zero-shot, supervised few-shot and T rounds of unsupervised ICL on ``task``'s questions, with the generator
    that ``load_generator()`` gives (called once, where a stage is left to answer); results in ``run.output_dir``."""
    out_dir = Path(run.output_dir)
    seed_everything(run.seed)
    n_shots = run.N
    template = asdict(run.template)
    one_prompt_samples = 1 if run.protocol == "original" else run.num_repeats  # zero-shot's and the baseline's
    log.info("%s: %d questions, %d-shot prompts, %d votes, %s backend, protocol %s", run.dataset.name,
             len(task.rows), n_shots, run.num_repeats, run.backend, run.protocol)

    device = resolve_device(run.device) if run.backend == "hf" else None
    dtype = compute_dtype(run.model, run.backend, device)
    state = RunState(out_dir / "state.json", {
        "task": run.dataset.name, "model": asdict(run.model), "backend": run.backend,
        "template": template, "N": n_shots, "num_repeats": run.num_repeats,
        "seed": run.seed, "sampling": [run.max_new_tokens, run.temperature, run.top_p], "protocol": run.protocol,
        "data": fingerprint_digest([task.sources, task.rows, task.gold, task.exemplars]), "dtype": dtype,
    }, unrecorded={"dtype": dtype_before_recorded(run.model, run.backend, device)})
    stage = partial(answer_stage, state, cache(load_generator), task)

    # ---- round 0: zero-shot chain of thought
    zero_shot = stage("zero_shot", lambda: ([[fmt.zero_shot_prompt(r)] for r in task.rows], {}),
                      one_prompt_samples, (run.seed, 0))

    # ---- baseline: supervised few-shot with written exemplars (never used by the rounds)
    supervised = None
    if run.supervised_icl and task.exemplars:
        supervised = stage("supervised_icl", lambda: (supervised_prompts(task, fmt, n_shots, (run.seed, 1)), {}),
                           one_prompt_samples, (run.seed, 1))

    # ---- unsupervised ICL: demonstrations are the other questions with the previous round's responses
    rounds, previous = [], zero_shot
    for t in range(1, run.T + 1):
        name, key = f"round_{t}", (run.seed, t + 1)
        previous = stage(name, partial(round_prompts, task, fmt, previous, n_shots, run.num_repeats, key, name),
                         1, key)
        rounds.append(previous)

    # ---- control: zero-shot majority vote over as many samples per question as the stages above drew
    controls = {}
    if "majority_vote" in run.controls:
        samples = one_prompt_samples + run.T * run.num_repeats
        controls["majority_vote"] = stage("control_majority_vote", lambda: (
            [[fmt.zero_shot_prompt(r)] for r in task.rows], {"samples_per_question": samples}), samples,
            (run.seed, run.T + 2))

    # ---- results
    results = {
        "task": run.dataset.name, "model": run.model.name, "num_test": len(task.rows),
        "zero_shot": summary(task, zero_shot),
        "supervised_icl": summary(task, supervised) if supervised else None,
        "rounds": [{"round": t, **summary(task, r), "pool_size": r["pool_size"]} for t, r in enumerate(rounds, 1)],
        **({"controls": {name: {**summary(task, c), "samples_per_question": c["samples_per_question"]}
                         for name, c in controls.items()},
            "gain_over_best_control": {"method": f"round {len(rounds)}" if rounds else "zero-shot",
                                       "control": "majority_vote", **paired_gain(
                                           task.correct((rounds[-1] if rounds else zero_shot)["answers"]),
                                           task.correct(controls["majority_vote"]["answers"]), run.seed)}}
           if controls else {}),
        "timing": {"seconds": state.seconds, "prompts_scored": state.prompts},
        "settings": {"N": n_shots, "T": run.T, "num_repeats": run.num_repeats, "seed": run.seed,
                     "protocol": run.protocol, "backend": run.backend, "temperature": run.temperature,
                     "controls": list(run.controls),
                     "top_p": run.top_p, "max_new_tokens": run.max_new_tokens,
                     "prompt_style": run.prompt_style.name if run.prompt_style else None, "template": template,
                     "dtype": dtype},
    }
    def per_question(stage):
        return [{"answer": a, "correct": ok, "response": r}
                for a, ok, r in zip(stage["answers"], task.correct(stage["answers"]), stage["responses"])]

    zs, sup, rnd = per_question(zero_shot), supervised and per_question(supervised), [per_question(r) for r in rounds]
    ctl = {name: per_question(c) for name, c in controls.items()}
    write_jsonl(out_dir / "answers.jsonl", [
        {"source": task.sources[q], "question": row.get(run.dataset.question_field), "gold": task.gold[q],
         **({"category": task.categories[q]} if task.categories else {}), "zero_shot": zs[q],
         **({"supervised_icl": sup[q]} if sup else {}), "rounds": [r[q] for r in rnd],
         **({"controls": {name: c[q] for name, c in ctl.items()}} if ctl else {})}
        for q, row in enumerate(task.rows)])
    write_results(out_dir, results)
    log.info("results in %s", out_dir)
    return results
