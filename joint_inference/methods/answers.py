"""Answer extraction for generative reasoning tasks (GSM8K, MMLU-Pro).

Chain-of-thought responses end with a final answer in one of a handful of
surface forms ("The answer is 18.", "\\boxed{18}", "Answer: (C)", ...).  This
module cuts a GSM8K response right after its first final-answer statement (as
the original release does, so that what is scored and what is shown as a
demonstration is the same text), turns free text into a comparable value (a
float for GSM8K, a letter for MMLU-Pro), parses GSM8K gold answers, compares
numbers with a tolerance and aggregates sampled answers by majority vote (the vote
of every generation task, MMMU's included).

``original_parser_number`` and ``original_parser_choice`` read a response the way
the original release does: ``protocol=original`` answers with them, and results
count the GSM8K answers where our more robust reading differs.
"""

from __future__ import annotations

import ast
import math
import numbers
import re
from typing import Iterator

__all__ = [
    "extract_number",
    "gold_number",
    "numbers_equal",
    "extract_choice",
    "read_choice",
    "cut_after_answer",
    "original_parser_number",
    "original_parser_choice",
    "same_answer",
    "majority_vote",
]

# ---------------------------------------------------------------------------
# Number grammar
# ---------------------------------------------------------------------------

# Minus-like characters that models emit for a negative sign.  The ASCII
# hyphen comes first so that it is literal inside a regex character class.
_MINUS_CHARS = "-\u2212\ufe63\uff0d"  # ASCII hyphen, minus sign, small / fullwidth hyphen-minus
_SIGN = rf"[{_MINUS_CHARS}+]"

# An unsigned decimal: comma-grouped thousands (1,234 / 1,234,567.5), plain
# digits with an optional (possibly empty) fraction (42, 3., 3.25), or a bare
# fraction (.5); an optional exponent (1.5e6).
_NUM = (
    r"(?:\d{1,3}(?:,\d{3}(?!\d))+(?:\.\d+)?"
    r"|\d+(?:\.\d*)?"
    r"|\.\d+)"
    r"(?:[eE][-+]?\d+)?"
)

# Things allowed between an answer phrase and the number itself: whitespace,
# markdown emphasis, math delimiters, currency, ':'/'='/'≈', hedging words.
_FILLER = (
    r"(?:\s|\*|_|:|=|\u2248|~|\(|\\\(|\\\[|\\\$|\$"
    r"|(?:approximately|approx\.?|about|around|roughly|nearly|almost|exactly"
    r"|just|only|equal\s+to|equals|a\s+total\s+of)\b)*"
)

_LEADING_NUMBER_RE = re.compile(
    r"^" + _FILLER
    + rf"(?P<sign>{_SIGN}?)\s*(?:\\?\$\s*)?(?P<sign2>[{_MINUS_CHARS}]?)\s*"
    + rf"(?P<num>{_NUM})"
    + r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?)(?![\d/]))?",
    re.IGNORECASE,
)

# Any number in running text (used by the optional last-number fallback).  A
# sign only counts when it is not glued to a preceding word/number ("3-5").
_ANY_NUMBER_RE = re.compile(
    rf"(?:(?<![\w)\]])(?P<sign>[{_MINUS_CHARS}]))?\\?\$?(?<![\d.,])(?P<num>{_NUM})"
)

# "answer is", "answer:", "final answer is:", "answer would be", "answer =".
_ANSWER_PHRASE_RE = re.compile(
    r"\banswer\s*(?:(?:is|would\s+be|will\s+be|should\s+be)\b\s*:?|[:=])",
    re.IGNORECASE,
)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _to_float(num_text: str) -> float | None:
    try:
        value = float(num_text.replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _is_negative(sign: str | None) -> bool:
    return bool(sign) and sign in _MINUS_CHARS


def _leading_value(s: str) -> float | None:
    """Parse the number at the start of ``s`` (after allowed filler)."""
    m = _LEADING_NUMBER_RE.match(s)
    if m is None:
        return None
    value = _to_float(m.group("num"))
    if value is None:
        return None
    den = m.group("den")
    if den is not None:
        den_value = _to_float(den)
        if not den_value:  # None or zero denominator: not a usable fraction
            return None
        value = value / den_value
    negative = _is_negative(m.group("sign")) != _is_negative(m.group("sign2"))
    return -value if negative else value


# ---------------------------------------------------------------------------
# LaTeX clean-up
# ---------------------------------------------------------------------------

_TEXT_WRAPPER_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}"
)
_FRAC_RE = re.compile(
    rf"(?:(?P<whole>\d+)\s*)?\\frac\s*"
    rf"(?:\{{\s*(?P<a>[{_MINUS_CHARS}]?\s*{_NUM})\s*\}}|(?P<a1>\d))\s*"
    rf"(?:\{{\s*(?P<b>{_NUM})\s*\}}|(?P<b1>\d))"
)


def _format_float(value: float) -> str:
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _replace_frac(m: re.Match) -> str:
    a_text = (m.group("a") or m.group("a1")).replace(" ", "")
    negative = a_text[0] in _MINUS_CHARS
    a = _to_float(a_text.lstrip(_MINUS_CHARS))
    b = _to_float(m.group("b") or m.group("b1"))
    if a is None or not b:
        return m.group(0)
    value = a / b
    if m.group("whole") is not None:  # mixed number: 3\frac{1}{2} = 3.5
        value += float(m.group("whole"))
    if negative:
        value = -value
    return _format_float(value)


def _delatex(s: str) -> str:
    """Reduce the LaTeX that models put around numbers to plain text."""
    s = re.sub(r"\\[dt]frac\b", r"\\frac", s)
    for _ in range(3):  # unwrap nested \text{...} a few levels deep
        new = _TEXT_WRAPPER_RE.sub(lambda m: " " + m.group(1) + " ", s)
        if new == s:
            break
        s = new
    s = re.sub(r"\\(?:left|right)\b", "", s)
    s = s.replace("\\$", "$").replace("\\%", "%").replace("{,}", ",")
    s = re.sub(r"(?<=\d)\\,(?=\d{3}(?!\d))", "", s)  # 1\,234 thousands spacing
    s = re.sub(r"\\[,;:!]|\\ ", " ", s)
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = _FRAC_RE.sub(_replace_frac, s)
    return s


def _iter_boxed(text: str) -> Iterator[tuple[int, str]]:
    """Yield (start, content) for every \\boxed{...} with balanced braces."""
    for m in _BOXED_RE.finditer(text):
        depth = 1
        i = m.end()
        while i < len(text) and depth:
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
            i += 1
        if depth == 0:
            yield m.start(), text[m.end():i - 1]


def _boxed_number(content: str) -> float | None:
    plain = _delatex(content).replace("{", " ").replace("}", " ").strip()
    if "=" in plain:  # \boxed{x = 18}
        plain = plain.rsplit("=", 1)[1]
    return _leading_value(plain)


# ---------------------------------------------------------------------------
# Public API: numbers
# ---------------------------------------------------------------------------


# The original release's GSM8K final-answer statement: "The answer is" / "The final answer is", then on the
# same line the first digit and the run of digits, "$", "€", ",", ".", "\\", brackets and braces after it.
# Case-sensitive, as there.
_STATEMENT_RE = re.compile(r"The(?: final)? answer is .*?(?P<number>\d[\d\\$€,(){}.]*)")


def cut_after_answer(text: str) -> str:
    """``text`` up to the end of its first final-answer statement ("The answer is 18."), else all of it.

    The original release cuts every GSM8K response there: a model often goes on with a new question or a
    second thought ("Wait... The answer is 20."), and neither belongs to its answer or its demonstration.
    """
    statement = _STATEMENT_RE.search(text or "")
    return text[:statement.end()] if statement else text


def _read_number(text: str, fallback_last_number: bool) -> float | None:
    """The last boxed number, else the number after the last answer phrase, else (optionally) the last number."""
    for _, content in reversed(list(_iter_boxed(text))):
        value = _boxed_number(content)
        if value is not None:
            return value

    plain = _delatex(text)
    for m in reversed(list(_ANSWER_PHRASE_RE.finditer(plain))):
        value = _leading_value(plain[m.end():])
        if value is not None:
            return value

    if fallback_last_number:
        matches = list(_ANY_NUMBER_RE.finditer(plain))
        if matches:
            last = matches[-1]
            value = _to_float(last.group("num"))
            if value is not None:
                return -value if _is_negative(last.group("sign")) else value
    return None


def extract_number(text: str, *, fallback_last_number: bool = False) -> float | None:
    """Return the final numeric answer of a chain-of-thought response.

    When the response has a final-answer statement ("The answer is 18." / "The final answer is 18", the
    first one, as in the original release), the answer is read from that statement alone: a boxed number in
    it, else the number after "answer is", else its last number. Otherwise, from the whole text:
      1. the content of the last ``\\boxed{...}`` that contains a number;
      2. the number right after the last "answer is" / "final answer is" /
         "answer:" phrase that is followed by a number (case-insensitive;
         currency signs, markdown, hedges such as "approximately" and
         trailing units/percent signs are tolerated);
      3. only when ``fallback_last_number`` is true, the last number anywhere
         in the text.
    Otherwise ``None``.  Signs (including the unicode minus), thousands
    separators, decimals, simple fractions (``3/4``, ``\\frac{3}{4}``) and
    mixed numbers in LaTeX (``2\\frac{1}{2}``) are understood.
    """
    if not text:
        return None
    statement = _STATEMENT_RE.search(text)
    if statement:
        return _read_number(statement.group(), fallback_last_number=True)
    return _read_number(text, fallback_last_number)


def gold_number(answer_field: str) -> float:
    """Parse a GSM8K gold ``answer`` field: the number after the last '####'."""

    if isinstance(answer_field, str) and len(answer_field) > 400:
        shown = repr("..." + answer_field[-400:])
    else:
        shown = repr(answer_field)
    if not isinstance(answer_field, str) or "####" not in answer_field:
        raise ValueError(f"GSM8K gold answer has no '####' marker: {shown}")
    value = _leading_value(answer_field.rsplit("####", 1)[1])
    if value is None:
        raise ValueError(f"cannot parse a number after '####' in GSM8K gold answer: {shown}")
    return value


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def numbers_equal(a: float | None, b: float | None, rel_tol: float = 1e-9,
                  abs_tol: float = 1e-9) -> bool:
    """Numeric equality up to float rounding (18 == 18.0, 0.1 + 0.2 == 0.3), never up to a digit: the default
    tolerance keeps 1000000 and 1000001 apart, as the original's exact comparison does. ``None`` (or NaN) is
    never equal to anything."""
    if a is None or b is None:
        return False
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return False
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)


def original_parser_number(text: str) -> float | None:
    """The number the original release reads from a GSM8K response, or ``None`` where it reads nothing.

    The digits and symbols that end its first final-answer statement, trailing dots dropped, "$ % g , { } ( )"
    deleted, read as a Python number literal (so no sign, no fraction, and "08" or "1.2.3" read nothing).
    Results count where ``extract_number`` disagrees with it.
    """
    statement = _STATEMENT_RE.search(text or "")
    if statement is None:
        return None
    digits = re.sub(r"[$%g,{}()]", "", statement.group("number").rstrip("."))
    try:
        value = ast.literal_eval(digits)
    except (SyntaxError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


# ---------------------------------------------------------------------------
# Public API: multiple choice
# ---------------------------------------------------------------------------

_CHOICE_PHRASE_RE = re.compile(
    r"(?i:\b(?:answer|choice|option)(?:\s*(?:is|would\s+be|will\s+be|should\s+be)\b\s*:?|\s*:))"
    r"(?:\s|\*|_|\$|\\\(|(?i:option|choice|letter)\b)*"
    r"(?:\((?P<paren>[A-Za-z])\)|\[(?P<bracket>[A-Za-z])\]|(?P<bare>[A-Z])(?![A-Za-z0-9]))"
)
_BOXED_CHOICE_RE = re.compile(
    r"^(?:\(?(?P<a>[A-Za-z])\)?\.?|\((?P<b>[A-Za-z])\)\s.*|(?P<c>[A-Za-z])[.)]\s.*)$", re.DOTALL
)


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """Return the multiple-choice letter a response commits to, or ``None``.

    Recognised: "The answer is (C)", "the answer is C.", "Answer: C",
    "The correct option is C", ``\\boxed{C}`` / ``\\boxed{(C)}`` /
    ``\\boxed{\\text{C}}``.  The last occurrence in the text wins; letters
    outside ``letters`` are ignored.  A bare capital letter must stand alone;
    a bare "A" or "I" followed by a lowercase word ("The answer is A dog") is
    read as English, not as a choice.
    """
    if not text:
        return None
    allowed = letters.upper()
    candidates: list[tuple[int, str]] = []

    for m in _CHOICE_PHRASE_RE.finditer(text):
        letter = m.group("paren") or m.group("bracket") or m.group("bare")
        if m.group("bare") and letter in "AI" and re.match(r"\s+[a-z]", text[m.end():]):
            continue
        letter = letter.upper()
        if letter in allowed:
            candidates.append((m.start(), letter))

    for start, content in _iter_boxed(text):
        plain = _delatex(content).replace("{", " ").replace("}", " ").strip().strip("*$ ").strip()
        bm = _BOXED_CHOICE_RE.match(plain)
        if bm:
            letter = (bm.group("a") or bm.group("b") or bm.group("c")).upper()
            if letter in allowed:
                candidates.append((start, letter))

    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def read_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The letter a response states (``extract_choice``), else its last standalone capital among ``letters``.

    The fallback is the original release's last resort for MMLU-Pro ("... which leaves B." reads B). It
    also reads an article ("A"), so a response answered only this way is not used as a demonstration.
    """
    stated = extract_choice(text, letters)
    if stated is not None or not text:
        return stated
    standalone = re.findall(rf"\b[{re.escape(letters.upper())}]\b", text)
    return standalone[-1] if standalone else None


def original_parser_choice(text: str) -> str | None:
    """The letter the original release reads from an MMLU-Pro response, or ``None`` where it reads nothing.

    Its three patterns in turn, each over all of A-J whatever the question's options: the first
    "answer is X" / "answer is (X)" (case-sensitive); else the first line with "answer:" / "Answer:"
    and a letter after it (the last such on that line); else the last standalone capital A-J.
    """
    for pattern, flags in ((r"answer is \(?([A-J])", 0), (r".*[aA]nswer:\s*([A-J])", 0),
                           (r"\b([A-J])\b(?!.*\b[A-J]\b)", re.DOTALL)):
        found = re.search(pattern, text or "", flags)
        if found:
            return found.group(1)
    return None


# ---------------------------------------------------------------------------
# Majority vote
# ---------------------------------------------------------------------------


def same_answer(a, b) -> bool:
    """Whether two readings are the same vote: numbers within ``numbers_equal``'s tolerance (18 and 18.0),
    other values by ``==``; a number never matches a non-number, and ``None`` agrees only with ``None``."""
    if a is None or b is None:
        return a is b
    if _is_number(a) or _is_number(b):
        return _is_number(a) and _is_number(b) and numbers_equal(a, b)
    return a == b


def majority_vote(answers: list, rng=None) -> object | None:
    """Most frequent non-``None`` answer; ties broken with ``rng``, or won by the first seen without one.

    Answers are grouped by ``same_answer`` (NaN counts as an abstention); each group is represented by its
    first-seen member.  ``rng`` is a ``numpy.random.Generator``; it is consulted only when there is a tie.
    ``rng=None`` gives a tie to the answer seen first, as ``Counter.most_common`` does in the original
    release.  Returns ``None`` if every answer is ``None``.
    """
    groups: list[list] = []  # [representative, count]
    for ans in answers:
        if ans is None or (_is_number(ans) and math.isnan(float(ans))):
            continue
        for group in groups:
            if same_answer(ans, group[0]):
                group[1] += 1
                break
        else:
            groups.append([ans, 1])
    if not groups:
        return None
    best = max(count for _, count in groups)
    tied = [rep for rep, count in groups if count == best]
    if len(tied) == 1 or rng is None:
        return tied[0]
    return tied[int(rng.integers(len(tied)))]
