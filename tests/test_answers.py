import math

import numpy as np
import pytest

from joint_inference.methods.answers import (
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

NUMBER_CASES = [
    # plain answer phrase
    ("So she has 18 left. The answer is 18.", 18.0),
    ("The answer is 18", 18.0),
    ("the answer is 7", 7.0),
    # signs
    ("The temperature drops below zero. The answer is -5.", -5.0),
    ("The answer is \u22125.", -5.0),  # unicode minus
    ("The answer is +4.", 4.0),
    ("The answer is -$12.", -12.0),
    # boxed
    ("Therefore \\boxed{18}", 18.0),
    ("We get \\boxed{-3.5}.", -3.5),
    ("So the fraction is \\boxed{\\frac{3}{4}}", 0.75),
    ("\\boxed{\\dfrac{1}{2}}", 0.5),
    ("\\boxed{-\\frac{1}{4}}", -0.25),
    ("\\boxed{2\\frac{1}{2}}", 2.5),
    ("\\boxed{3/4}", 0.75),
    ("\\boxed{\\$18}", 18.0),
    ("\\boxed{18\\text{ dollars}}", 18.0),
    ("\\boxed{\\text{18 eggs}}", 18.0),
    ("\\boxed{1{,}234}", 1234.0),
    ("\\boxed{x = 12}", 12.0),
    ("\\boxed{45^\\circ}", 45.0),
    ("$\\boxed{18}$ is the total", 18.0),
    # currency, separators, decimals
    ("The answer is $1,234.50", 1234.5),
    ("The final answer is 1,234,567", 1234567.0),
    ("The final answer is 1,234,567.5.", 1234567.5),
    ("The answer is 18 dollars.", 18.0),
    ("The answer is 18 eggs", 18.0),
    ("The answer is: $18.00", 18.0),
    ("The answer is: 18", 18.0),
    ("Final answer: 18", 18.0),
    ("The answer is **$18**.", 18.0),
    ("The answer is 42%", 42.0),
    ("The answer is 42\\%.", 42.0),
    ("The answer is .5", 0.5),
    ("The answer is 3.", 3.0),
    ("The answer is 3/4.", 3.0),  # the statement ends at the slash (the original's cut): see CUT_CASES
    ("The answer is $\\frac{3}{4}$.", 0.75),
    ("The answer is approximately 3.14", 3.14),
    ("The answer is about 20 minutes.", 20.0),
    ("The answer is (-5).", -5.0),
    ("THE ANSWER IS 9", 9.0),
    ("The answer is 1,000.", 1000.0),
    # the first "The (final) answer is N" statement wins; without one, the last answer phrase
    ("The answer is 5. Wait, I made a mistake. The answer is 7.", 5.0),
    ("the answer is 5. Wait, I made a mistake. the answer is 7.", 7.0),
    ("The answer is 12. Hence the answer is clear.", 12.0),
    # boxed beats answer phrases and later numbers, but not a final-answer statement
    ("\\boxed{12} and then 13 more things, 14", 12.0),
    ("\\boxed{12}. The answer is 13.", 13.0),
    ("\\boxed{12}. the answer is 13.", 12.0),
    ("First \\boxed{1}, corrected: \\boxed{2}", 2.0),
    ("\\boxed{C} ... The answer is 4.", 4.0),  # non-numeric boxed falls through
    # nothing usable
    ("I have no idea.", None),
    ("There were 5 apples and 3 pears.", None),  # no fallback by default
    ("", None),
    ("The answer is unknown.", None),
]


@pytest.mark.parametrize("text,expected", NUMBER_CASES)
def test_extract_number(text, expected):
    got = extract_number(text)
    if expected is None:
        assert got is None
    else:
        assert got is not None and isinstance(got, float)
        assert math.isclose(got, expected, rel_tol=1e-9), (text, got)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("There were 5 apples and 3 pears.", 3.0),
        ("She pays $1,234.50 in total.", 1234.5),
        ("It ends at -7.", -7.0),
        ("Pages 3-5", 5.0),
        ("No numbers here.", None),
        ("The answer is 4 and later 9", 4.0),  # answer phrase still beats fallback
    ],
)
def test_extract_number_fallback(text, expected):
    assert extract_number(text, fallback_last_number=True) == expected


def test_fallback_is_keyword_only():
    with pytest.raises(TypeError):
        extract_number("5", True)


@pytest.mark.parametrize(
    "field,expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72.0),
        ("... #### 1,000", 1000.0),
        ("#### -3", -3.0),
        ("#### 2.5", 2.5),
        ("####18", 18.0),
    ],
)
def test_gold_number(field, expected):
    assert gold_number(field) == expected


@pytest.mark.parametrize("field", ["She has 18 eggs left. The answer is 18.", "#### ", "#### none"])
def test_gold_number_errors(field):
    with pytest.raises(ValueError) as exc:
        gold_number(field)
    msg = str(exc.value)
    assert "GSM8K" in msg and field.strip()[:10] in msg


def test_numbers_equal():
    assert numbers_equal(18, 18.0)
    assert numbers_equal(0.1 + 0.2, 0.3)
    assert numbers_equal(1e9, 1e9 + 1, rel_tol=1e-6)
    assert not numbers_equal(1_000_000, 1_000_001)  # an off-by-one on a large GSM8K answer is wrong
    assert not numbers_equal(2_880_000, 2_880_002)
    assert not numbers_equal(18, 19)
    assert not numbers_equal(0.3, 0.31)
    assert not numbers_equal(None, 1.0)
    assert not numbers_equal(1.0, None)
    assert not numbers_equal(None, None)
    assert not numbers_equal(float("nan"), float("nan"))
    assert numbers_equal(0.0, -0.0)


CHOICE_CASES = [
    ("Let's think step by step... The answer is (C).", "C"),
    ("the answer is C.", "C"),
    ("Answer: C", "C"),
    ("answer: (b)", "B"),
    ("The answer is \\boxed{C}", "C"),
    ("\\boxed{(D)}", "D"),
    ("\\boxed{\\text{E}}", "E"),
    ("\\boxed{(F) 42 kg}", "F"),
    ("The answer is (A). On reflection, the answer is (B).", "B"),
    ("\\boxed{A} but actually the answer is (J).", "J"),
    ("The answer is (G) 12 m/s", "G"),
    ("The correct option is H", "H"),
    ("The answer is **I**.", "I"),
    ("The answer is: option (E)", "E"),
    ("The answer is (K).", None),  # outside A-J
    ("The answer is (B). The answer is (K).", "B"),  # invalid later letter ignored
    ("The answer is A dog.", None),  # English article, not a choice
    ("The answer is Cats.", None),
    ("No conclusion reached.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", CHOICE_CASES)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_extract_choice_respects_letters():
    assert extract_choice("The answer is (E).", letters="ABCD") is None
    assert extract_choice("The answer is (D).", letters="ABCD") == "D"


@pytest.mark.parametrize("text,letters,expected", [
    ("Work it out... the answer is (C)", "ABCDEFGHIJ", "C"),  # a stated answer wins over later letters
    ("The answer is (B), not D", "ABCDEFGHIJ", "B"),
    # MMLU-Pro's last resort, as in the original: the last standalone capital A-J
    ("Options D and E remain; E is heavier, so it is E.", "ABCDEFGHIJ", "E"),
    ("Between (F) and (G) I pick (G)", "ABCDEFGHIJ", "G"),
    ("A simple case.", "ABCDEFGHIJ", "A"),  # an article reads as A, which is why it never demonstrates
    ("It is J, or else D", "ABCD", "D"),  # letters beyond the question's options are skipped
    ("It is J", "ABCD", None),
    ("DNA and RNA, no verdict.", "ABCDEFGHIJ", None),  # letters inside words do not count
    ("", "ABCDEFGHIJ", None),
])
def test_read_choice_falls_back_to_the_last_standalone_letter(text, letters, expected):
    assert read_choice(text, letters) == expected


# What the original release's MMLU-Pro parser reads (checked against its extract_answer): the first
# case-sensitive "answer is (X)", else the first line with "answer:"/"Answer:" and a letter (the last on that
# line, the letter possibly on the next line), else the last standalone capital A-J, whatever the options.
@pytest.mark.parametrize("text,expected", [
    ("So the answer is (C)", "C"),
    ("answer is D. Then the answer is (E)", "D"),  # the first statement, where ours reads the last
    ("Answer: C", "C"),
    ("The Answer: B, or Answer: C\nAnswer: D", "C"),
    ("Answer:\nB", "B"),
    ("I think the answer is likely C", "C"),  # the last letter, though "answer is" reads nothing
    ("The Answer is (C)", "C"),
    ("So J", "J"),  # beyond a four-option question's letters, still read
    ("It is (K)", None),
    ("DNA and RNA", None),
    ("", None),
])
def test_original_parser_choice(text, expected):
    assert original_parser_choice(text) == expected


# A GSM8K response is cut right after its first final-answer statement, as the original release cuts it
# (case-sensitive "The answer is" / "The final answer is", then on the same line a number and the run of
# digits, "$", "€", ",", ".", "\\", brackets and braces after it). Columns: the response, the text kept
# (scored and shown as a demonstration), our answer, and what the original's parser reads from it.
CUT_CASES = [
    # the two cases of issue 10: what follows the first statement is not part of the answer
    ("Half of 36 is 18. The answer is 18.\n\nProblem: Tom has 2 cats and 3 dogs. How many pets? \\boxed{5}",
     "Half of 36 is 18. The answer is 18.", 18.0, 18.0),
    ("Half of 36 is 18. The answer is 18.\nWait, I forgot the tip. The answer is 20.",
     "Half of 36 is 18. The answer is 18.", 18.0, 18.0),
    ("The answer is 7.\n\nQ: What is 2+2?\nA: The answer is 4.", "The answer is 7.", 7.0, 7.0),
    ("The answer is 18 dollars. The answer is 20.", "The answer is 18", 18.0, 18.0),
    ("The final answer is 42.", "The final answer is 42.", 42.0, 42.0),
    ("So 2,500 - 500 = 2,000. The final answer is 2,000.\nThe answer is 2000",
     "So 2,500 - 500 = 2,000. The final answer is 2,000.", 2000.0, 2000.0),
    # boxed: inside the statement it is the answer; before it, the statement wins
    ("The final answer is $\\boxed{42}$.\n\nQ: next", "The final answer is $\\boxed{42}$.", 42.0, 42.0),
    ("The answer is \\boxed{7}. The final answer is 8.", "The answer is \\boxed{7}.", 7.0, 7.0),
    ("First \\boxed{5}, which is wrong. The answer is 6. Then more.",
     "First \\boxed{5}, which is wrong. The answer is 6.", 6.0, 6.0),
    # our number parsing on the kept text: signs, separators, decimals, fractions
    ("The answer is -5.\nQ: next", "The answer is -5.", -5.0, 5.0),
    ("The answer is \u22125.", "The answer is \u22125.", -5.0, 5.0),
    ("The answer is x = -4.\n", "The answer is x = -4.", -4.0, 4.0),
    ("The answer is $1,234.50 in total.", "The answer is $1,234.50", 1234.5, 1234.5),
    ("The answer is 1,000.", "The answer is 1,000.", 1000.0, 1000.0),
    ("The answer is 12.5.\n", "The answer is 12.5.", 12.5, 12.5),
    ("The answer is \\frac{1}{2}.", "The answer is \\frac{1}{2}.", 0.5, 12.0),
    ("The answer is 3/4.", "The answer is 3", 3.0, 3.0),
    ("The answer is 5 + 3 = 8.", "The answer is 5", 5.0, 5.0),
    ("The answer is **18**.\n\nExplanation", "The answer is **18", 18.0, 18.0),
    ("The answer is (C) 12 apples.", "The answer is (C) 12", 12.0, 12.0),
    ("The answer is 08 apples.", "The answer is 08", 8.0, None),  # "08" is no Python literal
    ("The answer is: 18.\nThe answer is 20.", "The answer is: 18.\nThe answer is 20.", 20.0, 20.0),  # "is:" is none
    ("The answer is 15\u20ac.", "The answer is 15\u20ac.", 15.0, None),
    # no statement (lower case, a line break, boxed only): nothing is cut; ours reads on, the original does not
    ("the answer is 18.\nThe answer is 20.", "the answer is 18.\nThe answer is 20.", 20.0, 20.0),
    ("the answer is 18.\n\nQ: next", "the answer is 18.\n\nQ: next", 18.0, None),
    ("THE ANSWER IS 9", "THE ANSWER IS 9", 9.0, None),
    ("The answer is\n18.", "The answer is\n18.", 18.0, None),
    ("So we get \\boxed{18}.", "So we get \\boxed{18}.", 18.0, None),
    ("No final statement, 7 apples.", "No final statement, 7 apples.", None, None),
    ("", "", None, None),
]


@pytest.mark.parametrize("text,kept,ours,original", CUT_CASES)
def test_response_is_cut_after_its_first_answer_statement(text, kept, ours, original):
    assert cut_after_answer(text) == kept
    assert extract_number(kept) == extract_number(text) == ours  # the kept text carries the whole answer
    assert original_parser_number(kept) == original_parser_number(text) == original


def test_cut_keeps_a_statement_whole_and_text_without_one_unchanged():
    for text, kept, _, _ in CUT_CASES:
        assert text.startswith(kept) and cut_after_answer(kept) == kept


def test_same_answer_is_the_votes_grouping():
    assert same_answer(18, 18.0) and same_answer(0.1 + 0.2, 0.3) and same_answer("C", "C")
    assert not same_answer("1", 1) and not same_answer(1.0, 2.0) and not same_answer("B", "C")
    assert same_answer(None, None) and not same_answer(None, 0.0) and not same_answer("A", None)


def test_majority_vote_basic():
    rng = np.random.default_rng(0)
    assert majority_vote([18, 18.0, 5, None], rng) == 18
    assert majority_vote([None, 3.0, 4.0, 4], rng) == 4.0
    assert majority_vote(["C", "B", "C", None], rng) == "C"
    assert majority_vote([0.1 + 0.2, 0.3, 0.5], rng) == pytest.approx(0.3)
    assert majority_vote([7], rng) == 7
    assert majority_vote([1_000_001, 1_000_000, 5, 5], rng) == 5  # near-misses are two votes, not one group


def test_majority_vote_all_none():
    rng = np.random.default_rng(0)
    assert majority_vote([None, None], rng) is None
    assert majority_vote([], rng) is None
    assert majority_vote([float("nan"), None], rng) is None


def test_majority_vote_numbers_and_strings_do_not_mix():
    rng = np.random.default_rng(0)
    assert majority_vote(["1", 1, 1.0], rng) == 1


def test_majority_vote_tie_uses_rng():
    outcomes = {majority_vote([1.0, 2.0, None, 2, 1], np.random.default_rng(seed)) for seed in range(64)}
    assert outcomes == {1.0, 2.0}
    letters = {majority_vote(["A", "B"], np.random.default_rng(seed)) for seed in range(64)}
    assert letters == {"A", "B"}


def test_majority_vote_tie_without_rng_goes_to_the_first_seen():
    # the original's Counter.most_common: among tied answers, the one seen first
    assert majority_vote([None, 2.0, 1.0, 1, 2]) == 2.0
    assert majority_vote(["B", "A", "A", "B", "C"]) == "B"
    assert majority_vote(["B", "A", "A"]) == "A"


def test_majority_vote_tie_is_reproducible():
    a = [majority_vote([1, 2, 3], np.random.default_rng(s)) for s in range(10)]
    b = [majority_vote([1, 2, 3], np.random.default_rng(s)) for s in range(10)]
    assert a == b
