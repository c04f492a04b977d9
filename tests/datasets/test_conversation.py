"""Conversations: which tokens are scored, where the image goes, and what bad conversations are told."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlforge.datasets.conversation import (
    IGNORE,
    IMAGE_TOKEN_ID,
    ConversationTemplate,
    check_conversation,
    encode_conversation,
    from_captions,
    from_questions,
)
from vlforge.datasets.demo_tokenizer import SPECIAL_TOKENS, save_vocab_tokenizer
from vlforge.datasets.instruct import ConversationCollator, ConversationSample
from vlforge.datasets.samples import SampleError
from vlforge.datasets.shards import RawSample

WORDS = ["user", "assistant", ":", "what", "colour", "is", "it", "red", "and", "shape", "circle", "a", "picture"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    directory = tmp_path_factory.mktemp("tok")
    save_vocab_tokenizer([*SPECIAL_TOKENS, *WORDS], directory)
    return AutoTokenizer.from_pretrained(str(directory))


def ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


TURNS = [{"from": "human", "value": "<image>\nwhat colour is it"}, {"from": "gpt", "value": "red"},
         {"from": "human", "value": "what shape is it"}, {"from": "gpt", "value": "a circle"}]


def test_chat_scores_only_the_answers_and_their_end(tokenizer: PreTrainedTokenizerFast) -> None:
    template = ConversationTemplate(name="chat", system="", user="user", assistant="assistant")
    input_ids, labels = encode_conversation(tokenizer, template, TURNS, max_len=64)
    bos, sep = tokenizer.bos_token_id, tokenizer.sep_token_id
    expected = ([bos] + ids(tokenizer, "user:") + [IMAGE_TOKEN_ID] + ids(tokenizer, "what colour is it assistant:")
                + ids(tokenizer, "red") + [sep] + ids(tokenizer, "user: what shape is it assistant:")
                + ids(tokenizer, "a circle") + [sep])
    assert input_ids == expected
    scored = [i for i, label in zip(input_ids, labels) if label != IGNORE]
    assert scored == ids(tokenizer, "red") + [sep] + ids(tokenizer, "a circle") + [sep]
    assert all(label in (IGNORE, token) for label, token in zip(labels, input_ids))

    prompt, _ = encode_conversation(tokenizer, template, TURNS[:2], max_len=64, prompt_only=True)
    assert prompt == expected[: expected.index(ids(tokenizer, "red")[0])]


def test_plain_is_the_image_then_the_caption(tokenizer: PreTrainedTokenizerFast) -> None:
    turns = [{"from": "human", "value": "<image>\nwhat is it"}, {"from": "gpt", "value": "a red circle"}]
    input_ids, labels = encode_conversation(tokenizer, ConversationTemplate(name="plain"), turns, max_len=64)
    caption = ids(tokenizer, "a red circle") + [tokenizer.sep_token_id]
    assert input_ids == [tokenizer.bos_token_id, IMAGE_TOKEN_ID] + caption
    assert labels == [IGNORE, IGNORE] + caption


def test_truncation_keeps_max_len_and_refuses_a_conversation_with_no_answer_left(tokenizer: PreTrainedTokenizerFast) -> None:
    template = ConversationTemplate(name="chat", system="", user="user", assistant="assistant")
    input_ids, labels = encode_conversation(tokenizer, template, TURNS, max_len=14)
    assert len(input_ids) == len(labels) == 14
    with pytest.raises(SampleError, match="no answer token within max_text_len=5"):
        encode_conversation(tokenizer, template, TURNS, max_len=5)


@pytest.mark.parametrize("turns, message", [
    ([], "non-empty list"),
    ([{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}], r"conversations\[0\] must be \{'from': 'human'"),
    ([{"from": "human", "value": "<image> x"}], "end with a human turn"),
    ([{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}], "more than one <image>"),
])
def test_malformed_conversations_are_named(turns: list, message: str) -> None:
    with pytest.raises(SampleError, match=message):
        check_conversation(turns)


def test_conversations_from_captions_and_questions() -> None:
    meta = {"image_id": "7", "captions": ["a red circle", "a picture of a circle"],
            "qa": [{"question": "what colour is it?", "answers": ["red"] * 7 + ["orange"] * 3},
                   {"question": "what shape is it?", "answers": ["circle"] * 10}]}
    assert from_captions(meta, "k", train=False) == [{"from": "human", "value": "<image>"},
                                                     {"from": "gpt", "value": "a red circle"}]
    turns = from_questions(meta, "k", train=False)
    assert [t["value"] for t in turns] == ["<image>\nwhat colour is it?", "red", "what shape is it?", "circle"]


def test_collator_pads_labels_with_ignore_and_flattens_every_prompt_on_the_left(tokenizer: PreTrainedTokenizerFast,
                                                                                tmp_path: Path) -> None:
    tokenizer.save_pretrained(str(tmp_path))
    collate = ConversationCollator(str(tmp_path))

    def asked(prompt: list[int], question: str) -> dict:
        return {"prompt_ids": torch.tensor(prompt), "question": question, "sample_id": question, "answers": ["x"]}

    batch = collate([
        {"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "input_ids": torch.tensor([2, 5, 6]),
         "labels": torch.tensor([IGNORE, 5, 6]), "prompts": [asked([2, 5], "q1"), asked([2, 5, 6, 7], "q2")]},
        {"image": torch.ones(3, 4, 4, dtype=torch.uint8), "input_ids": torch.tensor([2, 7]),
         "labels": torch.tensor([IGNORE, 7]), "prompts": [asked([2], "q3")]},
    ])
    assert batch["input_ids"].tolist() == [[2, 5, 6], [2, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 5, 6], [IGNORE, 7, IGNORE]]
    assert batch["prompt_input_ids"].tolist() == [[0, 0, 2, 5], [2, 5, 6, 7], [0, 0, 0, 2]]
    assert batch["prompt_attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["prompt_row"].tolist() == [0, 0, 1]
    assert batch["question"] == batch["sample_id"] == ["q1", "q2", "q3"] and batch["answers"] == [["x"]] * 3
    assert batch["image"].shape == (2, 3, 4, 4)


def _raw(meta: dict) -> RawSample:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return RawSample(key="k0", shard="shard-0.tar", files={"png": buffer.getvalue(), "json": json.dumps(meta).encode()})


def test_evaluation_asks_every_question_of_a_sample(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer.save_pretrained(str(tmp_path))
    chat = ConversationTemplate(system="")

    def evaluation(source: str, meta: dict) -> list[dict]:
        return ConversationSample(lambda image: image.size, str(tmp_path), chat, source, 64, train=False)(_raw(meta))["prompts"]

    def prompt_ids(turns: list[dict]) -> list[int]:
        return encode_conversation(tokenizer, chat, turns, 64, prompt_only=True)[0]

    # A conversation: each human turn after the turns before it, with their reference answers.
    prompts = evaluation("conversations", {"image_id": "img7", "conversations": TURNS})
    assert [p["sample_id"] for p in prompts] == ["img7_q0", "img7_q1"]
    assert [p["question"] for p in prompts] == ["what colour is it", "what shape is it"]
    assert [p["answers"] for p in prompts] == [["red"], ["a circle"]]
    assert prompts[0]["prompt_ids"].tolist() == prompt_ids(TURNS[:1])
    assert prompts[1]["prompt_ids"].tolist() == prompt_ids(TURNS[:3])
    assert ids(tokenizer, "red")[0] in prompts[1]["prompt_ids"].tolist()  # the history holds the first answer

    # Questions: each alone with the image, keyed by its question id, against every human answer.
    meta = {"image_id": "img7", "qa": [{"question": "what colour is it", "answers": ["red"] * 7 + ["pink"] * 3},
                                       {"question": "what shape is it", "answers": ["circle"] * 10}]}
    prompts = evaluation("questions", meta)
    assert [p["sample_id"] for p in prompts] == ["img7_q0", "img7_q1"]
    assert prompts[1]["prompt_ids"].tolist() == prompt_ids([{"from": "human", "value": "<image>\nwhat shape is it"}])
    assert prompts[0]["answers"] == ["red"] * 7 + ["pink"] * 3

    prompts = evaluation("captions", {"image_id": "img7", "captions": ["a red circle", "a circle"]})
    assert len(prompts) == 1 and prompts[0]["sample_id"] == "img7"
    assert prompts[0]["answers"] == ["a red circle", "a circle"]


def test_an_unknown_template_is_named() -> None:
    with pytest.raises(ValueError, match="template.name='chatt': expected plain or chat"):
        ConversationTemplate(name="chatt")
