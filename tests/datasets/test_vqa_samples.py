"""VQA samples: per-question shards and per-image `qa` lists, for training and for evaluation."""
from __future__ import annotations

import io
import json
import random

import pytest
from PIL import Image

from vlforge.datasets.samples import SampleError, VQASample
from vlforge.datasets.shards import RawSample


def _raw(meta: dict, key: str = "k0") -> RawSample:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return RawSample(key=key, shard="shard-0.tar", files={"png": buffer.getvalue(), "json": json.dumps(meta).encode()})


PER_IMAGE = {"image_id": "img7", "qa": [
    {"question": "what color is it?", "answers": ["red"] * 9 + ["pink"], "answer_type": "color"},
    {"question": "how many shapes?", "answers": ["two"] * 10, "answer_type": "number"},
]}
PER_QUESTION = {"image_id": "img3", "question_id": 4031, "question": "Is it sunny?", "answers": ["yes", "yes", "no"]}


def test_evaluation_keeps_every_question_with_its_answers() -> None:
    sample = VQASample(lambda image: image.size, str.lower, train=False)
    out = sample(_raw(PER_IMAGE))
    assert out["question"] == ["what color is it?", "how many shapes?"]
    assert out["question_ids"] == ["img7_q0", "img7_q1"] and out["answer_types"] == ["color", "number"]
    assert out["answers"][0].count("red") == 9
    single = sample(_raw(PER_QUESTION))
    assert single["question_ids"] == ["4031"] and single["question"] == ["is it sunny?"]
    assert single["answer_types"] == ["other"]


def test_training_draws_answers_by_annotator_count() -> None:
    sample = VQASample(lambda image: image.size, str.lower, train=True)
    random.seed(0)
    drawn = [sample(_raw({"image_id": "i", "question": "Q", "answers": ["red"] * 9 + ["pink"]}))["answer"]
             for _ in range(400)]
    assert all(len(answers) == 1 for answers in drawn)  # a per-question shard: one question per sample
    drawn = [answers[0] for answers in drawn]
    assert 0.8 < drawn.count("red") / len(drawn) < 0.97


def test_training_takes_every_question_of_an_image() -> None:
    sample = VQASample(lambda image: image.size, str.lower, train=True)
    out = sample(_raw(PER_IMAGE))
    assert set(out) == {"image", "image_id", "question", "answer"}
    assert out["question"] == ["what color is it?", "how many shapes?"]
    assert out["answer"][0] in ("red", "pink") and out["answer"][1] == "two"


def test_a_sample_without_questions_is_named() -> None:
    sample = VQASample(lambda image: image, str.lower, train=False)
    with pytest.raises(SampleError, match="missing field 'question'"):
        sample(_raw({"image_id": "x", "captions": ["a"]}))
    with pytest.raises(SampleError, match="question x_q0"):
        sample(_raw({"image_id": "x", "qa": [{"question": "q", "answers": []}]}))


def test_weighted_training_pairs_each_question_with_every_distinct_answer_and_its_share() -> None:
    sample = VQASample(lambda image: image.size, str.lower, train=True, weighted_answers=True)
    out = sample(_raw(PER_IMAGE))
    assert out["question"] == ["what color is it?", "what color is it?", "how many shapes?"]
    assert out["answer"] == ["red", "pink", "two"]
    assert out["answer_weight"] == pytest.approx([0.9, 0.1, 1.0])
    out = sample(_raw(PER_QUESTION))
    assert out["question"] == ["is it sunny?"] * 2 and out["answer"] == ["yes", "no"]
    assert out["answer_weight"] == pytest.approx([2 / 3, 1 / 3])
