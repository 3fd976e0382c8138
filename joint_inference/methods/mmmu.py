"""MMMU and MMMU-Pro through a vision-language model behind an API (the paper's GPT-4o experiment).

    python unsupervised_icl_llm.py +experiment=mmmu_gpt4o                    # MMMU validation, 30 subjects
    python unsupervised_icl_llm.py +experiment=mmmu_gpt4o dataset=mmmu_pro   # MMMU-Pro, standard (10 options)

The protocol of the original release's ``unsupervised_icl_mmmu.py`` (prompts in ``configs/template/mmmu.yaml``):

* **Prompt**: a system message per question type (multiple-choice: end with "Answer: $LETTER"; open: "The final
  answer is $ANSWER"), then the user's turn: the question with ``<image i>`` written "image i", its options
  lettered "A. ...", the format instruction, and the question's images (``image_1`` ... ``image_7``, up to the
  first empty one) as base64 PNG ``image_url`` parts (``detail: low``).
* **Round 0**: every question answered zero-shot (greedy; ``num_repeats`` samples voted when sampling).
* **Round t = 1..T**: each question is asked again after ``N`` (8) demonstrations: *other* questions of the
  same subject as user turns, each followed by its round t-1 response as the assistant's turn. A multiple-choice
  response demonstrates only if it states "Answer: X" with one of its options' letters; MMMU's multiple-choice
  questions get multiple-choice demonstrations, its open questions the open ones first, then multiple-choice.
* **Scores**: accuracy per subject and overall (over all questions; ``macro_accuracy`` is the mean over
  subjects). A multiple-choice answer is the last "Answer: X" among the options' letters, else "The best answer
  is X", else the last standalone option letter; an open answer is what follows the last "The final answer is",
  compared with the gold answer(s) as text or as a number.

``protocol=original`` reads answers with the original's three patterns for every question (open ones included,
as its accuracy does), lets a multiple-choice response demonstrate only where its second pattern read it,
and takes open demonstrations in dataset order. Each stage of each subject is saved when it finishes and every
request is cached, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import ast
import base64
import io
import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cache, partial
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError
from ..core.settings import MMMUSettings, MMMUTemplate, TextICLSettings
from ..core.utils import fingerprint_digest, seed_everything
from ..data.hub import load_split
from ..reporting.results import RunState, interval, markdown_table, pct, write_jsonl, write_results
from .answers import numbers_equal
from .generation import answer_stage, draw, question_rng

log = logging.getLogger(__name__)
LETTERS = "ABCDEFGHIJ"
MC, OPEN = "multiple-choice", "open"
MAX_IMAGES = 7
ALL = "all"


# ----------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class MMMUFormat:
    """The prompts of ``configs/template/mmmu.yaml``: system message and format instruction per question type."""

    system: dict
    suffix: dict
    image_detail: str | None = "low"

    @classmethod
    def from_template(cls, template: MMMUTemplate) -> MMMUFormat:
        t = asdict(template)
        missing = [k for k in ("system", "suffix") if not isinstance(t.get(k), dict) or MC not in t[k]]
        if missing:
            raise ConfigError(f"the MMMU template lacks {missing}: each maps the question types ({MC}, {OPEN}) to "
                              "its text, as configs/template/mmmu.yaml does")
        return cls(dict(t["system"]), dict(t["suffix"]), t.get("image_detail"))

    def question_text(self, row: dict) -> str:
        """The user's text: question, lettered options (multiple-choice), format instruction; '<image i>' -> 'image i'."""
        qtype = row["question_type"]
        options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(row["options"])) if qtype == MC else ""
        text = f"{row['question']}\n{options}\n{self.suffix[qtype]}"
        for i in range(1, MAX_IMAGES + 1):
            text = text.replace(f"<image {i}>", f"image {i}")
        return text

    def user_content(self, row: dict) -> list[dict]:
        image = {"detail": self.image_detail} if self.image_detail else {}
        return [{"type": "text", "text": self.question_text(row)},
                *({"type": "image_url", "image_url": {"url": url, **image}} for url in row["image_urls"])]

    def messages(self, row: dict, demonstrations: list[tuple[dict, str]] = ()) -> list[dict]:
        """System message, each demonstration as a user turn and its response as the assistant's, the query."""
        turns = []
        for demo, response in demonstrations:
            turns += [{"role": "user", "content": self.user_content(demo)},
                      {"role": "assistant", "content": [{"type": "text", "text": response}]}]
        return [{"role": "system", "content": [{"type": "text", "text": self.system[row["question_type"]]}]},
                *turns, {"role": "user", "content": self.user_content(row)}]


# ----------------------------------------------------------------------------------------- answers
ANSWER_LINE = re.compile(r"(?i:answer)\s*:\s*[*_]*\s*\(?([A-Z])\)?(?![A-Za-z0-9])")
BEST_ANSWER = re.compile(r"(?i:the best answer is)\s*[*_]*\s*\(?([A-Z])\)?(?![A-Za-z0-9])")
FINAL_ANSWER = re.compile(r"(?i:the final answer is)\s*:?\s*(.+)")


def letters_of(row: dict) -> str:
    return LETTERS[:len(row["options"])]


def read_choice(text: str, letters: str) -> tuple[str | None, bool]:
    """(letter, stated): the last "Answer: X" among ``letters`` (stated), else "the best answer is X", else the
    last standalone letter among them."""
    stated = [m[1] for m in ANSWER_LINE.finditer(text) if m[1] in letters]
    if stated:
        return stated[-1], True
    best = [m[1] for m in BEST_ANSWER.finditer(text) if m[1] in letters]
    if best:
        return best[-1], False
    loose = re.findall(rf"\b([{letters}])\b", text)
    return (loose[-1], False) if loose else (None, False)


def read_open(text: str) -> str | None:
    """What follows the last "The final answer is", without markup and a closing full stop."""
    found = FINAL_ANSWER.findall(text)
    if not found:
        return None
    value = found[-1].strip().strip("*_`$ ").rstrip(".").strip()
    return value or None


def original_reading(text: str) -> tuple[str | None, int]:
    """The original release's answer reading: ("The best answer is X" -> 1) else (the first line with "answer:",
    its last one -> 2) else (the last standalone A-J after which no capital letter stands alone -> 3) else 4."""
    m = re.search(r"The best answer is \(?([A-Z])\)?", text)
    if m:
        return m[1], 1
    m = re.search(r".*[aA]nswer:\s*([A-Z])", text)
    if m:
        return m[1], 2
    m = re.search(r"\b[A-J]\b(?!.*\b[A-Z]\b)", text, re.DOTALL)
    return (m[0], 3) if m else (None, 4)


def gold_answers(gold) -> list[str]:
    """The accepted answers of an open question: the field's text, or each entry of a list written as text."""
    if isinstance(gold, (list, tuple)):
        return [str(g) for g in gold]
    text = str(gold).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            return [str(g) for g in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return [text]


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip("*_`$ ").rstrip(".").lower())


def _number(text: str) -> float | None:
    m = re.fullmatch(r"\s*([-+]?\d[\d,]*\.?\d*|[-+]?\.\d+)\s*(%|[a-zA-Z°]+)?\s*", text)
    if not m:
        return None
    try:
        return float(m[1].replace(",", ""))
    except ValueError:
        return None


def open_correct(prediction: str | None, gold) -> bool:
    """Whether an open answer equals one of the gold answers, as normalised text or as a number."""
    if prediction is None:
        return False
    for g in gold_answers(gold):
        if _normal(prediction) == _normal(g):
            return True
        a, b = _number(prediction), _number(g)
        if a is not None and b is not None and numbers_equal(a, b, rel_tol=1e-4):
            return True
    return False


# ----------------------------------------------------------------------------------------- data
def image_url(image) -> str:
    """A data URL of an image (PIL, the hub's ``{"bytes", "path"}``, or a file path) as base64 RGB PNG."""
    from PIL import Image

    if isinstance(image, dict):
        image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
    elif isinstance(image, (str, Path)):
        image = Image.open(image)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def question_row(raw: dict, subject: str, source: str) -> dict:
    """A hub row (MMMU or MMMU-Pro schema) as the prompt reads it; images as data URLs."""
    options = raw.get("options")
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{source}: options {options[:80]!r} are not a list written as text") from None
    qtype = raw.get("question_type") or MC  # MMMU-Pro's rows are all multiple-choice and say nothing
    if qtype not in (MC, OPEN):
        raise ConfigError(f"{source}: unknown question_type {qtype!r}; MMMU has {MC!r} and {OPEN!r}")
    options = [str(o) for o in options or []]
    if qtype == MC and not 0 < len(options) <= len(LETTERS):
        raise ConfigError(f"{source}: a multiple-choice question with {len(options)} options (1 to 10 supported)")
    images = []
    for i in range(1, MAX_IMAGES + 1):
        image = raw.get(f"image_{i}")
        if not image:
            break  # as the original: the images up to the first empty slot
        try:
            images.append(image_url(image))
        except Exception as err:
            raise ConfigError(f"{source}: image_{i} cannot be decoded ({type(err).__name__}: {err})") from None
    gold = raw.get("answer")
    if qtype == MC and (not isinstance(gold, str) or gold.strip() not in LETTERS[:len(options)]):
        raise ConfigError(f"{source}: gold answer {gold!r} is not one of the {len(options)} options' letters")
    return {"id": str(raw.get("id", source)), "subject": subject, "question_type": qtype,
            "question": str(raw["question"]), "options": options,
            "answer": gold.strip() if isinstance(gold, str) else gold, "image_urls": images}


def subject_table(d: MMMUSettings, subject: str):
    """One subject's rows as a ``datasets.Dataset``: a hub config per subject (MMMU, local files in
    ``<data_root>/mmmu/<subject>/<split>.parquet``), or one table filtered on ``subject_field`` (MMMU-Pro)."""
    source = d if d.subject_field else replace(d, hub_config=subject, name=f"{d.name}/{subject}")
    table = load_split(source, d.split)  # the subject's own hub config, and its own folder of local files
    if d.subject_field:
        values = table.with_format("arrow")[d.subject_field].to_pylist()
        table = table.select([i for i, v in enumerate(values) if v == subject])
    return table


def load_subject(d: MMMUSettings, subject: str) -> list[dict]:
    """A subject's questions (a seeded subset of ``num_examples`` when set), in dataset order."""
    table = subject_table(d, subject)
    keep = list(range(len(table)))
    if d.num_examples is not None and d.num_examples < len(keep):
        keep = sorted(np.random.default_rng(d.sample_seed).choice(len(keep), d.num_examples, replace=False).tolist())
    if not keep:
        raise ConfigError(f"subject {subject!r} of {d.name!r} has no questions in split {d.split!r}")
    return [question_row(table[i], subject, f"{d.name}/{subject}[{i}]") for i in keep]


# ------------------------------------------------------------------------------------------ rounds
@dataclass
class MMMUTask:
    """One subject's questions, read and scored as the protocol says (the interface of uicl_generation.answer)."""

    rows: list[dict]
    protocol: str = "clean"

    def read(self, q: int, text: str) -> tuple[str, object]:
        row = self.rows[q]
        if self.protocol == "original":
            return text, original_reading(text)[0]
        if row["question_type"] == OPEN:
            return text, read_open(text)
        return text, read_choice(text, letters_of(row))[0]

    def demonstrates(self, q: int, response: str) -> bool:
        """Whether a response may demonstrate: multiple-choice ones state "Answer: X" (the original: where its second
        pattern reads them), open ones state a final answer (the original: any)."""
        row = self.rows[q]
        if self.protocol == "original":
            return row["question_type"] == OPEN or original_reading(response)[1] == 2
        if row["question_type"] == OPEN:
            return read_open(response) is not None
        return read_choice(response, letters_of(row))[1]

    def correct(self, answers: list) -> list[bool]:
        out = []
        for row, a in zip(self.rows, answers):
            if row["question_type"] == OPEN and self.protocol != "original":
                out.append(open_correct(a, row["answer"]))
            else:
                out.append(a is not None and a == row["answer"])
        return out

    def pick(self, q: int, pool: list[int], n: int, rng: np.random.Generator) -> list[int]:
        """Up to ``n`` demonstrations of question q among ``pool`` (never q): multiple-choice for multiple-choice,
        open first then multiple-choice for open; the last drawn stands nearest the query."""
        others = [j for j in pool if j != q]
        mc = [j for j in others if self.rows[j]["question_type"] == MC]
        if self.rows[q]["question_type"] == MC:
            order = draw(mc, len(mc), rng)
        else:
            opened = [j for j in others if self.rows[j]["question_type"] == OPEN]
            order = opened + mc if self.protocol == "original" else draw(opened, len(opened), rng) + draw(mc, len(mc), rng)
        return order[:n][::-1]


def zero_shot_prompts(task: MMMUTask, fmt: MMMUFormat) -> tuple[list[list[list[dict]]], dict]:
    return [[fmt.messages(r)] for r in task.rows], {}


def round_prompts(task: MMMUTask, fmt: MMMUFormat, previous: dict, n_shots: int, num_repeats: int,
                  key: tuple, name: str) -> tuple[list[list[list[dict]]], dict]:
    """``num_repeats`` prompts per question, each with its own demonstrations from the previous round."""
    pool = [j for j, r in enumerate(previous["responses"]) if task.demonstrates(j, r)]
    prompts, chosen, short = [], [], []
    for q, row in enumerate(task.rows):
        rng = question_rng(key, q, 0)
        picks = [task.pick(q, pool, n_shots, rng) for _ in range(num_repeats)]
        if min(map(len, picks)) < n_shots:
            short.append(min(map(len, picks)))
        prompts.append([fmt.messages(row, [(task.rows[j], previous["responses"][j]) for j in p]) for p in picks])
        chosen.append([[task.rows[j]["id"] for j in p] for p in picks])
    if short:
        log.warning("%s: N=%d, but %d of %d questions have only %d-%d demonstrations with a stated answer",
                    name, n_shots, len(short), len(prompts), min(short), max(short))
    return prompts, {"pool_size": len(pool), "demonstrations": chosen}


# -------------------------------------------------------------------------------------------- run
def run_mmmu(run: TextICLSettings, load_generator: Callable) -> dict:
    """Zero-shot and T rounds of unsupervised ICL on every subject, with the generator that ``load_generator()``
    gives (called once, where a stage is left to answer); results in ``run.output_dir``."""
    if run.backend != "openai":
        raise ConfigError(f"dataset={run.dataset.name} runs a vision-language model behind an API: add backend=openai "
                          "(e.g. +experiment=mmmu_gpt4o, or model=openai_compatible model.name=<a vision model> "
                          "model.base_url=<its server>)")
    out_dir, d = Path(run.output_dir), run.dataset
    seed_everything(run.seed)
    fmt = MMMUFormat.from_template(run.template)
    subjects = list(d.subjects) if d.subject == ALL else [d.subject]
    unknown = [s for s in subjects if s not in d.subjects]
    if unknown:
        raise ConfigError(f"unknown subject(s) {unknown} of {d.name!r}; valid: all, {', '.join(d.subjects)}")
    n_shots = run.N
    state = RunState(out_dir / "state.json", {
        "task": d.name, "model": asdict(run.model), "backend": run.backend,
        "template": asdict(run.template), "N": n_shots, "num_repeats": run.num_repeats,
        "seed": run.seed, "sampling": [run.max_new_tokens, run.temperature, run.top_p], "protocol": run.protocol,
        "subjects": subjects, "split": d.split, "num_examples": d.num_examples,
    })
    load_generator = cache(load_generator)
    log.info("%s: %d subjects, %d-shot rounds, T=%d, %d votes, protocol %s", d.name, len(subjects), n_shots, run.T,
             run.num_repeats, run.protocol)

    for s, subject in enumerate(subjects):
        stages = [f"{subject}/zero_shot", *(f"{subject}/round_{t}" for t in range(1, run.T + 1))]
        if all(name in state for name in stages):
            continue
        task = MMMUTask(load_subject(d, subject), run.protocol)
        digest = fingerprint_digest([[r["id"], r["question"], r["options"], r["answer"]] for r in task.rows])
        if any(state[name]["data"] != digest for name in stages if name in state):
            raise ConfigError(f"{out_dir} holds answers to other {subject} questions than the data now has; "
                              "use a new run directory (hydra.run.dir=...)")

        annotate = partial(subject_fields, task, digest)
        previous = answer_stage(state, load_generator, task, stages[0], partial(zero_shot_prompts, task, fmt),
                                run.num_repeats, (run.seed, s, 0, 1), annotate)
        for t, name in enumerate(stages[1:], 1):
            build = partial(round_prompts, task, fmt, previous, n_shots, run.num_repeats, (run.seed, s, t), name)
            previous = answer_stage(state, load_generator, task, name, build, 1, (run.seed, s, t, 1), annotate)

    results = summarize(run, state, subjects, n_shots)
    write_jsonl(out_dir / "answers.jsonl", [
        {"id": ans["ids"][q], "subject": subject, "question_type": ans["question_types"][q], "gold": ans["gold"][q],
         "zero_shot": _per_question(ans, q),
         "rounds": [{**_per_question(state[f"{subject}/round_{t}"], q),
                     "demonstrations": state[f"{subject}/round_{t}"]["demonstrations"][q]} for t in range(1, run.T + 1)]}
        for subject in subjects for ans in [state[f"{subject}/zero_shot"]] for q in range(len(ans["ids"]))])
    write_results(out_dir, results, mmmu_table)
    log.info("results in %s", out_dir)
    return results


def subject_fields(task: MMMUTask, digest: str, stage: dict) -> dict:
    """What answers.jsonl and the summary read of a subject's stage besides its answers; ``data`` tells a resumed
    run whether the subject's questions are still the same."""
    return {"ids": [r["id"] for r in task.rows], "data": digest, "correct": task.correct(stage["answers"]),
            "question_types": [r["question_type"] for r in task.rows], "gold": [r["answer"] for r in task.rows]}


def _per_question(stage: dict, q: int) -> dict:
    return {"answer": stage["answers"][q], "correct": stage["correct"][q], "response": stage["responses"][q]}


def summarize(run: TextICLSettings, state: RunState, subjects: list[str], n_shots: int) -> dict:
    """Each stage's accuracy over all questions (``test_accuracy``), its mean over subjects (``macro_accuracy``)
    and per subject."""
    def stage(name):
        per = {s: state[f"{s}/{name}"]["correct"] for s in subjects}
        every = [c for s in subjects for c in per[s]]
        return {"test_accuracy": float(np.mean(every)), "macro_accuracy": float(np.mean([np.mean(per[s]) for s in per])),
                "answered": sum(a is not None for s in subjects for a in state[f"{s}/{name}"]["answers"]),
                "per_subject": {s: float(np.mean(per[s])) for s in subjects}}

    rounds = [{"round": t, **stage(f"round_{t}"),
               "pool_size": sum(state[f"{s}/round_{t}"]["pool_size"] for s in subjects)} for t in range(1, run.T + 1)]
    return {
        "task": run.dataset.name, "model": run.model.name,
        "num_test": sum(len(state[f"{s}/zero_shot"]["ids"]) for s in subjects),
        "num_subjects": len(subjects), "zero_shot": stage("zero_shot"), "supervised_icl": None, "rounds": rounds,
        "timing": {"seconds": state.seconds, "prompts_scored": state.prompts},
        "settings": {"N": n_shots, "T": run.T, "num_repeats": run.num_repeats, "seed": run.seed,
                     "protocol": run.protocol, "backend": run.backend, "temperature": run.temperature,
                     "top_p": run.top_p, "max_new_tokens": run.max_new_tokens, "split": run.dataset.split,
                     "subjects": subjects, "template": asdict(run.template)},
    }


def mmmu_table(results: dict) -> str:
    """results.md: the stages' accuracy over all questions (with the Wilson interval) and per subject."""
    lines = [markdown_table(results).rstrip("\n"), "",
             f"* **macro**: the mean of the {results['num_subjects']} subjects' accuracies.", "",
             "| stage | macro |", "| --- | --- |"]
    stages = [("zero-shot", results["zero_shot"])] + [(f"round {r['round']}", r) for r in results["rounds"]]
    lines += [f"| {name} | {pct(r['macro_accuracy'])} |" for name, r in stages]
    lines += ["", "| subject | " + " | ".join(name for name, _ in stages) + " |", "|" + " --- |" * (len(stages) + 1)]
    for subject in results["settings"]["subjects"]:
        lines.append(f"| {subject} | " + " | ".join(pct(r["per_subject"][subject]) for _, r in stages) + " |")
    n = results["num_test"]
    lines += ["", f"Overall: {pct(results['zero_shot']['test_accuracy'])} zero-shot "
              f"({interval(results['zero_shot']['test_accuracy'], n)})" +
              "".join(f", {pct(r['test_accuracy'])} after round {r['round']}" for r in results["rounds"]) + "."]
    return "\n".join(lines) + "\n"
