"""How a raw shard sample (bytes) becomes a model-ready dict; run inside the loader workers."""
from __future__ import annotations

import io
import json
import random
import re
from typing import Any, Callable

import torch
from PIL import Image

from vlforge.datasets.processors import ImageTransform
from vlforge.datasets.shards import RawSample

try:  # torchcodec's libjpeg-turbo decoder, straight to a tensor; its library is built for recent torch releases
    from torchcodec.decoders import decode_jpeg as _decode_jpeg
except (ImportError, OSError, RuntimeError):  # elsewhere every image goes through PIL
    _decode_jpeg = None

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

_CXX_LOCATION = re.compile(r"\w+, \S+:\d+, (.+)", re.DOTALL)

# Start-of-frame markers (which carry the image's size): 0xC0-0xCF but DHT, JPG and DAC.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length follows


class SampleError(ValueError):
    """A sample that cannot be used; the message names what is wrong with it."""


def image_file(raw: RawSample) -> bytes:
    """The encoded bytes of the sample's image: its first file of IMAGE_EXTENSIONS."""
    for ext in IMAGE_EXTENSIONS:
        if ext in raw.files:
            return raw.files[ext]
    raise SampleError(f"no image file (one of {', '.join(IMAGE_EXTENSIONS)}) among {sorted(raw.files)}")


def decode_image(raw: RawSample, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """The sample's image, RGB. A JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8) when that still
    gives at least `draft_size` (width, height): libjpeg's DCT scaling, most of the decoding saved."""
    # No `with`: closing would free the decoded pixels too (an RGB image is returned as decoded).
    image = Image.open(io.BytesIO(image_file(raw)))
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", draft_size)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header; None for bytes that are not a JPEG or end before it."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in _JPEG_STANDALONE_MARKERS:
            pos += 2
        elif marker in _JPEG_FRAME_MARKERS:
            if pos + 9 > len(data):
                return None
            height, width = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 7:pos + 9], "big")
            return width, height
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            return None
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def decode_whole_jpeg(raw: RawSample, draft_size: tuple[int, int] | None) -> torch.Tensor | None:
    """The sample's image as an RGB uint8 tensor [3, H, W] (channels last in memory) where it is a JPEG
    that `decode_image` would decode whole anyway (no DCT scaling reaches `draft_size`; within PIL's
    MAX_IMAGE_PIXELS), decoded by torchcodec: the same pixels as PIL's, without PIL's per-image
    overhead, which dominates small images. None for every other image, and without torchcodec."""
    if _decode_jpeg is None:
        return None
    data = image_file(raw)
    size = jpeg_size(data)
    if size is None or (Image.MAX_IMAGE_PIXELS is not None and size[0] * size[1] > Image.MAX_IMAGE_PIXELS):
        return None
    if draft_size is not None and min(size[0] // draft_size[0], size[1] // draft_size[1]) >= 2:
        return None
    try:
        return _decode_jpeg(data, mode="RGB")
    except RuntimeError as err:  # its text starts with the C++ function and source line that raised
        located = _CXX_LOCATION.match(str(err))
        raise SampleError(f"JPEG cannot be decoded: {located.group(1) if located else err}") from None


def load_image(raw: RawSample, image_transform: Callable[[Image.Image], Any]) -> Any:
    """`image_transform` of the sample's image, decoded no larger than the transform needs (its
    `draft_size`, see processors.ImageTransform); a whole JPEG straight to pixels for an ImageTransform."""
    draft_size = getattr(image_transform, "draft_size", None)
    if isinstance(image_transform, ImageTransform):
        pixels = decode_whole_jpeg(raw, draft_size)
        if pixels is not None:
            return image_transform(pixels)
    return image_transform(decode_image(raw, draft_size))


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
