"""How a raw shard sample (bytes) becomes a model-ready dict; run inside the loader workers."""
from __future__ import annotations

import io
import json
import random
from typing import Any, Callable

from PIL import Image

from vlforge.datasets.shards import RawSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class SampleError(ValueError):
    """A sample that cannot be used; the message names what is wrong with it."""


def decode_image(raw: RawSample, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """The sample's image, RGB. A JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8) when that still
    gives at least `draft_size` (width, height): libjpeg's DCT scaling, most of the decoding saved."""
    for ext in IMAGE_EXTENSIONS:
        if ext in raw.files:
            # No `with`: closing would free the decoded pixels too (an RGB image is returned as decoded).
            image = Image.open(io.BytesIO(raw.files[ext]))
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.load()
            return image if image.mode == "RGB" else image.convert("RGB")
    raise SampleError(f"no image file (one of {', '.join(IMAGE_EXTENSIONS)}) among {sorted(raw.files)}")


def load_image(raw: RawSample, image_transform: Callable[[Image.Image], Any]) -> Any:
    """`image_transform` of the sample's image, decoded no larger than the transform needs (its
    `draft_size`, see processors.ImageTransform)."""
    return image_transform(decode_image(raw, getattr(image_transform, "draft_size", None)))


def decode_meta(raw: RawSample) -> dict[str, Any]:
    if "json" not in raw.files:
        raise SampleError(f"no json file among {sorted(raw.files)}")
    meta = json.loads(raw.files["json"])
    if not isinstance(meta, dict):
        raise SampleError(f"json is a {type(meta).__name__}, expected an object")
    return meta


def image_text_meta(raw: RawSample) -> dict[str, Any]:
    """An image-text sample's metadata: its json, with the `.txt` file as its caption where the json
    has none, or the `.txt` alone: the layouts img2dataset and open_clip's shards use (`key.jpg`,
    `key.txt`, and a `key.json` of download metadata or nothing)."""
    meta = decode_meta(raw) if "json" in raw.files else {}
    if "captions" not in meta and "caption" not in meta and "txt" in raw.files:
        try:
            meta["caption"] = raw.files["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise SampleError(f"txt is not UTF-8 text ({err})") from None
    if not meta and "txt" not in raw.files:
        raise SampleError(f"no json or txt file among {sorted(raw.files)}")
    return meta


def captions_of(meta: dict[str, Any]) -> list[str]:
    captions = meta.get("captions", meta.get("caption"))
    if isinstance(captions, str):
        captions = [captions]
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise SampleError("missing field 'captions' (a non-empty list of non-empty strings)")
    return captions


class ImageTextSample:
    """Training: the image and one caption drawn at random (seeded per sample by the stream).

    Evaluation (`train=False`): the image, all its captions under `captions`, and `label` when present.
    """

    def __init__(
        self,
        image_transform: Callable[[Image.Image], Any],
        text_processor: Callable[[str], str],
        train: bool = True,
    ) -> None:
        self.image_transform, self.text_processor, self.train = image_transform, text_processor, train

    def __call__(self, raw: RawSample) -> dict[str, Any]:
        meta = image_text_meta(raw)
        image = load_image(raw, self.image_transform)
        sample: dict[str, Any] = {"image": image, "image_id": str(meta.get("image_id", raw.key))}
        if self.train:
            sample["text"] = self.text_processor(random.choice(captions_of(meta)))
            return sample
        if "captions" in meta or "caption" in meta:
            sample["captions"] = [self.text_processor(c) for c in captions_of(meta)]
        if "label" in meta:
            sample["label"] = int(meta["label"])
        return sample


def questions_of(meta: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """Every question of a sample: a per-question shard (question, answers, question_id) or a
    per-image one with a `qa` list (the demo). Each: question, answers, question_id, answer_type."""
    if "qa" in meta:
        entries = meta["qa"]
        ids = [f"{meta.get('image_id', key)}_q{i}" for i in range(len(entries))]
    elif "question" in meta:
        entries, ids = [meta], [str(meta.get("question_id", key))]
    else:
        raise SampleError("missing field 'question' (or a 'qa' list of questions)")
    out = []
    for entry, question_id in zip(entries, ids):
        answers = entry.get("answers", entry.get("answer"))
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(entry.get("question"), str) or not answers:
            raise SampleError(f"question {question_id}: needs a 'question' string and a non-empty 'answers' list")
        out.append({"question": entry["question"], "answers": [str(a) for a in answers],
                    "question_id": question_id, "answer_type": str(entry.get("answer_type", "other"))})
    return out


class VQASample:
    """Training: the image with every one of its questions (`question`, a list) and, per question, one
    of its human answers drawn at random (`answer`, a list; an answer given by more annotators is drawn
    more often, as LAVIS weights it). A per-question shard gives lists of one, LAVIS's sample; a
    per-image shard trains on all its questions in one step, so the image is encoded once for them
    and each step contrasts different questions about one image (the collator flattens the lists).

    With `weighted_answers`, training instead pairs each question with every distinct human answer
    (the question repeated once per answer) and gives `answer_weight`, the share of the question's
    answers each has: LAVIS's VQA training data, for its weighted loss (BlipVQA).

    Evaluation: the image and all its questions, as lists under `question` (tokenized by the
    collator as in training), `answers` (the human answers of each), `question_ids` and `answer_types`.
    """

    def __init__(self, image_transform: Callable[[Image.Image], Any], text_processor: Callable[[str], str],
                 train: bool = True, weighted_answers: bool = False) -> None:
        self.image_transform, self.text_processor, self.train = image_transform, text_processor, train
        self.weighted_answers = weighted_answers

    def __call__(self, raw: RawSample) -> dict[str, Any]:
        meta = decode_meta(raw)
        image = load_image(raw, self.image_transform)
        questions = questions_of(meta, raw.key)
        sample: dict[str, Any] = {"image": image, "image_id": str(meta.get("image_id", raw.key))}
        if self.train and self.weighted_answers:
            sample["question"], sample["answer"], sample["answer_weight"] = [], [], []
            for q in questions:
                for answer in dict.fromkeys(q["answers"]):  # distinct, in order of first mention
                    sample["question"].append(self.text_processor(q["question"]))
                    sample["answer"].append(answer)
                    sample["answer_weight"].append(q["answers"].count(answer) / len(q["answers"]))
            return sample
        if self.train:
            sample["question"] = [self.text_processor(q["question"]) for q in questions]
            sample["answer"] = [random.choice(q["answers"]) for q in questions]
            return sample
        sample["question"] = [self.text_processor(q["question"]) for q in questions]
        sample["answers"] = [q["answers"] for q in questions]
        sample["question_ids"] = [q["question_id"] for q in questions]
        sample["answer_types"] = [q["answer_type"] for q in questions]
        return sample
