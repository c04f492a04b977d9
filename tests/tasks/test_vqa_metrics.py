"""VQAv2 accuracy: the leave-one-out rule on hand-computed cases and the official normalisation."""
from __future__ import annotations

import pytest

from vlforge.tasks.metrics.vqa import CONTRACTIONS, _apostrophe_variants, normalize_answer, vqa_accuracy, vqa_metrics


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, 0.3),  # 9 subsets keep the one match (1/3 each), 1 subset drops it: 9 * (1/3) / 10
    (2, 0.6),  # 8 subsets keep both (2/3), 2 keep one (1/3): (16/3 + 2/3) / 10
    (3, 0.9),  # 7 subsets keep three (1), 3 keep two (2/3): (7 + 2) / 10
    (4, 1.0),
    (10, 1.0),
])
def test_leave_one_out_over_ten_answers(matches: int, expected: float) -> None:
    answers = ["dog"] * matches + ["cat", "horse", "sheep", "cow", "fox", "owl", "bee", "ant", "elk", "yak"][: 10 - matches]
    assert vqa_accuracy("dog", answers) == pytest.approx(expected)


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"),
    ("the dog", "dog"),
    ("A red, white and blue flag!", "red white and blue flag"),
    ("dont know", "don't know"),
    ("couldnt've", "couldn't've"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("yes.", "yes"),
    ("t-shirt", "t shirt"),
    ("  None \n", "0"),
])
def test_official_normalisation(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


def test_contraction_table_covers_every_apostrophe_variant() -> None:
    assert CONTRACTIONS["couldntve"] == CONTRACTIONS["couldn'tve"] == CONTRACTIONS["couldnt've"] == "couldn't've"
    assert "couldn't've" not in CONTRACTIONS  # the written form maps to nothing: it is the target


def test_normalised_prediction_meets_human_answers() -> None:
    humans = ["2", "2", "2", "two", "2", "2", "2", "2", "2", "2"]
    assert vqa_accuracy("Two.", humans) == 1.0
    # Agreeing human answers are compared as given.
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0


def test_metrics_average_and_split_by_answer_type() -> None:
    humans = {"q1": ["yes"] * 10, "q2": ["2"] * 10, "q3": ["red"] * 2 + ["blue"] * 8}
    out = vqa_metrics({"q1": "yes", "q2": "3", "q3": "red"}, humans, {"q1": "yes/no", "q2": "number", "q3": "other"})
    assert out["accuracy"] == pytest.approx((1.0 + 0.0 + 0.6) / 3)
    assert out["accuracy_yes_no"] == 1.0 and out["accuracy_number"] == 0.0 and out["accuracy_other"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"1 question\(s\) without a prediction \['q3'\]"):
        vqa_metrics({"q1": "yes", "q2": "2"}, humans)


def test_apostrophe_variants_drop_every_subset_of_apostrophes() -> None:
    assert _apostrophe_variants("couldn't've") == ["couldnt've", "couldn'tve", "couldntve"]
    assert _apostrophe_variants("don't") == ["dont"] and _apostrophe_variants("dog") == []


def test_human_answers_lose_punctuation_only_where_they_disagree() -> None:
    # As the official code: unanimous answers are compared as written ("yes." then matches nothing).
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # Two different answers: both lose their punctuation, and "yes." counts as "yes".
    assert vqa_accuracy("yes", ["yes."] * 5 + ["no"] * 5) == 1.0


def test_tabs_and_line_breaks_separate_words() -> None:
    assert normalize_answer("red\tcar") == "red car" and normalize_answer("two\ncats") == "2 cats"


def test_one_question_and_questions_without_a_type() -> None:
    assert vqa_metrics({"q": "yes"}, {"q": ["yes"] * 10}) == {"accuracy": 1.0}
    humans = {"q1": ["yes"] * 10, "q2": ["2"] * 10, "q3": ["red"] * 10}
    out = vqa_metrics({"q1": "yes", "q2": "2", "q3": "blue"}, humans, {"q1": "yes/no"})
    assert out == {"accuracy": pytest.approx(2 / 3), "accuracy_yes_no": 1.0, "accuracy_other": 0.5}


def test_errors_name_the_first_five_questions() -> None:
    humans = {f"q{i}": ["yes"] * 10 for i in range(7)}
    with pytest.raises(ValueError) as info:
        vqa_metrics({"q6": "yes"}, humans)
    assert str(info.value) == "vqa metrics: 6 question(s) without a prediction ['q0', 'q1', 'q2', 'q3', 'q4']"
    with pytest.raises(ValueError) as info:
        vqa_accuracy("yes", [])
    assert str(info.value) == "vqa accuracy needs the human answers of the question (VQAv2 has 10)"
