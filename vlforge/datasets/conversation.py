"""Conversation-format instruction data (LLaVA's): turns of `human` and `gpt`, an `<image>` placeholder in
the text, tokenized so that only the assistant's words are scored.

A shard sample's json holds `conversations` ([{"from": "human", "value": "<image>\\nWhat is ...?"},
{"from": "gpt", "value": "..."}, ...]), as LLaVA's llava_v1_5_mix665k.json does. Samples without one
(the demo's, COCO's) get a conversation from their captions or their questions (`from_captions`,
`from_questions`), as LLaVA's own pretraining data is captions posed as one-turn conversations.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

from vlforge.core.tokenizers import end_token_id
from vlforge.datasets.samples import SampleError, captions_of, questions_of

IMAGE_PLACEHOLDER = "<image>"
# The id that stands for the image's tokens in `input_ids` until the model splices them in (LLaVA's).
IMAGE_TOKEN_ID = -200
IGNORE = -100
ROLES = ("human", "gpt")


@dataclass(frozen=True)
class ConversationTemplate:
    """How turns become text. `plain` (LLaVA's pretraining): the image, then the answer and the end of
    sequence; the human's words are dropped. `chat` (LLaVA v1): a system line, then
    `USER: <question> ASSISTANT: <answer></s>` per turn."""

    name: str = "chat"  # plain | chat
    system: str = ("A chat between a curious user and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the user's questions.")
    user: str = "USER"
    assistant: str = "ASSISTANT"

    def __post_init__(self) -> None:
        if self.name not in ("plain", "chat"):
            raise ValueError(f"task.template.name={self.name!r}: expected plain or chat")


def check_conversation(turns: Any) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise SampleError("'conversations' must be a non-empty list of turns")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") != ROLES[i % 2] or not isinstance(turn.get("value"), str):
            raise SampleError(f"conversations[{i}] must be {{'from': '{ROLES[i % 2]}', 'value': <text>}} "
                              f"(turns alternate human, gpt), got {turn!r}"[:300])
    if len(turns) % 2:
        raise SampleError(f"conversations end with a human turn ({len(turns)} turns): no answer to learn")
    if sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns) > 1:
        raise SampleError(f"more than one {IMAGE_PLACEHOLDER} in conversations (one image per sample)")
    return turns


def from_captions(meta: dict[str, Any], key: str, train: bool) -> list[dict[str, str]]:
    """One caption (drawn at random in training, else the first) as the answer to the image alone."""
    captions = captions_of(meta)
    caption = random.choice(captions) if train else captions[0]
    return [{"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": caption}]


def from_questions(meta: dict[str, Any], key: str, train: bool) -> list[dict[str, str]]:
    """Every question of the image as a turn, answered by its most common human answer (the first
    turn carries the image); in random order in training."""
    questions = questions_of(meta, key)
    if train:
        questions = random.sample(questions, len(questions))
    turns: list[dict[str, str]] = []
    for i, qa in enumerate(questions):
        answers = [a for a in qa["answers"] if isinstance(a, str) and a.strip()]
        if not answers:
            raise SampleError(f"question {qa['question']!r} has no answer")
        best = max(sorted(set(answers)), key=answers.count)
        question = f"{IMAGE_PLACEHOLDER}\n{qa['question']}" if i == 0 else qa["question"]
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": best}]
    return turns


def _pieces(template: ConversationTemplate, turns: Sequence[dict[str, str]], open_last: bool) -> list[tuple[str, bool]]:
    """(text, scored) pieces in order; with `open_last` the conversation stops where the assistant's
    answer to the last human turn would begin (a generation prompt)."""
    if template.name == "plain":
        first = turns[0]["value"]
        pieces = [(IMAGE_PLACEHOLDER if IMAGE_PLACEHOLDER in first else "", False)]
        if not open_last:
            pieces.append((turns[1]["value"].strip(), True))
        return pieces
    pieces = [(template.system + " ", False)]
    for i in range(0, len(turns), 2):
        pieces.append((f"{template.user}: {turns[i]['value'].strip()} {template.assistant}:", False))
        if i + 1 < len(turns):
            pieces.append((" " + turns[i + 1]["value"].strip(), True))
    return pieces


def encode_conversation(tokenizer: Any, template: ConversationTemplate, turns: Sequence[dict[str, str]],
                        max_len: int, prompt_only: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the tokenizer's bos (if any), every piece, an end-of-sequence id after each
    answer; labels copy the answers' ids (and their end) and are IGNORE elsewhere. `<image>` becomes
    IMAGE_TOKEN_ID. `prompt_only` drops the last answer: what generation continues. Truncated to
    `max_len` ids; a conversation whose first answer does not fit is refused."""
    if prompt_only:
        turns = list(turns)[:-1] if len(turns) % 2 == 0 else list(turns)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = end_token_id(tokenizer)
    ids: list[int] = [bos] if bos is not None else []
    labels: list[int] = [IGNORE] * len(ids)
    for text, scored in _pieces(template, turns, open_last=prompt_only):
        for k, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k:
                ids.append(IMAGE_TOKEN_ID)
                labels.append(IGNORE)
            part_ids = tokenizer(part, add_special_tokens=False)["input_ids"] if part.strip() else []
            ids += part_ids
            labels += part_ids if scored else [IGNORE] * len(part_ids)
        if scored:
            ids.append(eos)
            labels.append(eos)
    if not prompt_only and all(label == IGNORE for label in labels[:max_len]):
        raise SampleError(f"no answer token within max_text_len={max_len} ({len(ids)} tokens)")
    return ids[:max_len], labels[:max_len]
