"""VQAv2 accuracy as the official evaluation computes it.

An answer scores min(#annotators who gave it / 3, 1), averaged over the 10 leave-one-out subsets of
the 10 human answers; answers are compared after the official normalisation (punctuation, articles,
number words, contractions).
"""
from __future__ import annotations

import itertools
import re
from collections import defaultdict
from typing import Mapping, Sequence

# Contractions as the official evaluation writes them; the same words typed without some or all of
# their apostrophes ("dont", "couldnt've", "couldn'tve") are mapped to these.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't it'd it'd've it'll it's let's "
    "ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd "
    "she'd've she'll she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's "
    "someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd we'd've we'll "
    "we're we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll "
    "who're who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've "
    "you'd you'd've you'll you're you've"
).split()


def _apostrophe_variants(word: str) -> list[str]:
    positions = [i for i, ch in enumerate(word) if ch == "'"]
    variants = []
    for count in range(1, len(positions) + 1):
        for dropped in itertools.combinations(positions, count):
            variants.append("".join(ch for i, ch in enumerate(word) if i not in dropped))
    return variants


CONTRACTIONS: dict[str, str] = {v: w for w in _CONTRACTIONS for v in _apostrophe_variants(w) if v}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not followed by a digit (the official pattern, quirk kept)
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    for mark in _PUNCTUATION:
        # Next to a space (or in a number like 1,000) a mark is deleted; inside a word it splits it.
        if f"{mark} " in text or f" {mark}" in text or _COMMA_BETWEEN_DIGITS.search(text):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    return _PERIOD.sub("", text)


def _digits_and_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_strip_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One question's accuracy: the mean over leave-one-out subsets of min(matches / 3, 1)."""
    if not human_answers:
        raise ValueError("vqa accuracy needs the human answers of the question (VQAv2 has 10)")
    predicted = normalize_answer(prediction)
    # As the official code: human answers (already normalised when VQAv2 was published) only lose
    # their punctuation, and only where they disagree.
    answers = list(human_answers)
    if len(set(answers)) > 1:
        answers = [_strip_punctuation(a) for a in answers]
    scores = []
    for left_out in range(len(answers)):
        matches = sum(1 for i, a in enumerate(answers) if i != left_out and a == predicted)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def vqa_metrics(predictions: Mapping[str, str], human_answers: Mapping[str, Sequence[str]],
                answer_types: Mapping[str, str] | None = None) -> dict[str, float]:
    """`accuracy` over all questions, and `accuracy_<type>` per answer type (yes/no, number, other)
    when the types are given. Every question needs a prediction (the error names the missing ones)."""
    missing = sorted(set(human_answers) - set(predictions))
    if missing:
        raise ValueError(f"vqa metrics: {len(missing)} question(s) without a prediction {missing[:5]}")
    per_question = {q: vqa_accuracy(predictions[q], answers) for q, answers in human_answers.items()}
    out = {"accuracy": sum(per_question.values()) / max(1, len(per_question))}
    if answer_types:
        by_type: dict[str, list[float]] = defaultdict(list)
        for q, score in per_question.items():
            by_type[answer_types.get(q, "other").replace("/", "_")].append(score)
        out.update({f"accuracy_{t}": sum(s) / len(s) for t, s in sorted(by_type.items())})
    return out
