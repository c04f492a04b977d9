"""Instruction samples and batches for LLaVA-style models: an image and a tokenized conversation whose
labels score only the assistant's answers (vlforge.datasets.conversation)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image

from vlforge.core.tokenizers import load_tokenizer, pad_token_id
from vlforge.datasets.conversation import (
    IGNORE,
    IMAGE_PLACEHOLDER,
    ConversationTemplate,
    check_conversation,
    encode_conversation,
    from_captions,
    from_questions,
)
from vlforge.datasets.samples import (
    SampleError,
    captions_of,
    decode_meta,
    load_image,
    questions_of,
)
from vlforge.datasets.shards import RawSample

SOURCES = ("conversations", "captions", "questions")


class ConversationSample:
    """`source`: where the conversation comes from: the sample's `conversations` field, or one made of
    its captions or its questions. Training: `image`, `input_ids`, `labels`. Evaluation also gives
    `prompts`, one per question the sample asks, each with `prompt_ids` (what generation continues),
    `question` (its text), `answers` (its reference answers) and `sample_id` (what the evaluation keys
    the answer by):
    - `conversations`: every human turn, after the conversation before it with its reference answers
      (the history a multi-turn chat has), turn k keyed `<image id>_q<k>` (as a demo image's questions);
    - `questions`: every question alone with the image, as LLaVA evaluates VQA, keyed by its question id
      and scored against every human answer;
    - `captions`: the image alone, keyed by its image id, scored against every caption.
    Prompts are not truncated to `max_len` (a cut prompt would lose the assistant's header)."""

    def __init__(self, image_transform: Callable[[Image.Image], Any], tokenizer: str, template: ConversationTemplate,
                 source: str, max_len: int, train: bool = True) -> None:
        if source not in SOURCES:
            raise ValueError(f"task.source={source!r}: expected one of {', '.join(SOURCES)}")
        self.image_transform, self.tokenizer, self.template = image_transform, tokenizer, template
        self.source, self.max_len, self.train = source, max_len, train

    def _turns(self, meta: dict[str, Any], key: str) -> list[dict[str, str]]:
        if self.source == "captions":
            return from_captions(meta, key, self.train)
        if self.source == "questions":
            return from_questions(meta, key, self.train)
        if "conversations" not in meta:
            raise SampleError("missing field 'conversations' (task.source=conversations)")
        return check_conversation(meta["conversations"])

    def _prompts(self, tok: Any, meta: dict[str, Any], key: str, turns: list[dict[str, str]]) -> list[dict[str, Any]]:
        image_id = str(meta.get("image_id", key))

        def prompt(context: list[dict[str, str]], sample_id: str, answers: list[str]) -> dict[str, Any]:
            ids, _ = encode_conversation(tok, self.template, context, 2**31, prompt_only=True)
            question = context[-1]["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            return {"prompt_ids": torch.tensor(ids), "question": question, "sample_id": sample_id, "answers": answers}

        if self.source == "captions":
            return [prompt(turns[:1], image_id, captions_of(meta))]
        if self.source == "questions":
            return [prompt([{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{qa['question']}"}], qa["question_id"],
                           qa["answers"]) for qa in questions_of(meta, key)]
        return [prompt(turns[: 2 * k + 1], f"{image_id}_q{k}", [turns[2 * k + 1]["value"]])
                for k in range(len(turns) // 2)]

    def __call__(self, raw: RawSample) -> dict[str, Any]:
        meta = decode_meta(raw)
        turns = self._turns(meta, raw.key)
        tok = load_tokenizer(self.tokenizer)
        ids, labels = encode_conversation(tok, self.template, turns, self.max_len)
        sample: dict[str, Any] = {"image": load_image(raw, self.image_transform),
                                  "image_id": str(meta.get("image_id", raw.key)),
                                  "input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if not self.train:
            sample["prompts"] = self._prompts(tok, meta, raw.key, turns)
        return sample


def pad_rows(rows: list[torch.Tensor], value: float, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows padded with `value` to the longest [B, longest, ...], attention mask [B, longest]): rows of
    any trailing shape, right-padded, or left-padded so that every row ends at the last position."""
    longest = max(len(r) for r in rows)
    out = rows[0].new_full((len(rows), longest, *rows[0].shape[1:]), value)
    mask = torch.zeros((len(rows), longest), dtype=torch.long, device=rows[0].device)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if left else slice(0, len(row))
        out[i, span], mask[i, span] = row, 1
    return out, mask


class ConversationCollator:
    """Batches of ConversationSample: `input_ids` / `labels` right-padded (pad id / IGNORE) with an
    `attention_mask`; images stacked; anything else kept as lists. Evaluation samples' `prompts` are
    flattened in sample order: `prompt_input_ids` left-padded with `prompt_attention_mask`, so that
    every prompt ends where generation starts, `prompt_row` [P] (the image row each prompt asks
    about), and `question`, `sample_id`, `answers` as lists of P."""

    def __init__(self, tokenizer: str) -> None:
        tok = load_tokenizer(tokenizer)  # fail now, naming the tokenizer, not later in a worker
        self.pad_id = pad_token_id(tok)

    def __call__(self, samples: list[dict]) -> dict:
        batch: dict[str, Any] = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            if key == "input_ids":
                batch["input_ids"], batch["attention_mask"] = pad_rows(values, self.pad_id)
            elif key == "labels":
                batch["labels"], _ = pad_rows(values, IGNORE)
            elif key == "prompts":
                prompts = [p for row in values for p in row]
                batch["prompt_input_ids"], batch["prompt_attention_mask"] = pad_rows(
                    [p["prompt_ids"] for p in prompts], self.pad_id, left=True)
                batch["prompt_row"] = torch.tensor([row for row, asked in enumerate(values) for _ in asked])
                for field in ("question", "sample_id", "answers"):
                    batch[field] = [p[field] for p in prompts]
            elif isinstance(values[0], torch.Tensor):
                batch[key] = torch.stack(values)
            else:
                batch[key] = values
        return batch
