"""Collator: dynamic padding, truncation, and an instruction / prompt prefix per text key."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from vlforge.config.recipes import compose_recipe
from vlforge.config.schema import validate_config
from vlforge.core.tokenizers import load_tokenizer
from vlforge.datasets.collate import Collator
from vlforge.datasets.demo_tokenizer import save_wordpiece_tokenizer

PROMPT = "a picture of "
CAPTIONS = ["a red circle", "a small blue square to the left of a large green triangle", "two shapes"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The built-in demo tokenizer, trained on a few captions: no download."""
    out = tmp_path_factory.mktemp("tokenizer")
    texts = CAPTIONS + [PROMPT, "what shape is it", "the answer is a circle"]
    save_wordpiece_tokenizer(texts, vocab_size=200, out_dir=out)
    return str(out)


def _bare(tokenizer_dir: str, text: str) -> list[int]:
    return load_tokenizer(tokenizer_dir)(text, add_special_tokens=False)["input_ids"]


def _rows(batch: dict, key: str = "text") -> list[list[int]]:
    """Each sample's ids without padding."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch[f"{key}_input_ids"], batch[f"{key}_attention_mask"])]


def test_prompt_is_prepended_after_the_leading_special_token(tokenizer_dir: str) -> None:
    tok = load_tokenizer(tokenizer_dir)
    batch = Collator(tokenizer_dir, 32, prompts={"text": PROMPT})([{"text": c} for c in CAPTIONS])
    for row, caption in zip(_rows(batch), CAPTIONS):
        assert row == [tok.cls_token_id, *_bare(tokenizer_dir, PROMPT), *_bare(tokenizer_dir, caption), tok.sep_token_id]
        # The same ids as tokenizing the joined string, which is what BLIP's captioner trains on.
        assert row == tok(PROMPT + caption)["input_ids"]
    assert tok.decode(_rows(batch)[0], skip_special_tokens=True) == "a picture of a red circle"


def test_prompt_length_counts_the_leading_special_token_and_the_prompt(tokenizer_dir: str) -> None:
    tok = load_tokenizer(tokenizer_dir)
    batch = Collator(tokenizer_dir, 32, prompts={"text": PROMPT})([{"text": c} for c in CAPTIONS])
    length = batch["text_prompt_length"]
    assert length.shape == (len(CAPTIONS),) and length.dtype == torch.long
    expected = 1 + len(_bare(tokenizer_dir, PROMPT))
    assert length.tolist() == [expected] * len(CAPTIONS)
    # What vlforge.models.blip.decoder.special_token_ids derives from the tokenizer for the same prompt.
    assert expected == len(tok(PROMPT).input_ids) - 1
    # Masking the first prompt_length positions leaves exactly the caption and [SEP] to be scored.
    for row, n, caption in zip(_rows(batch), length.tolist(), CAPTIONS):
        assert row[n:] == [*_bare(tokenizer_dir, caption), tok.sep_token_id]


def test_truncation_shortens_the_caption_never_the_prompt(tokenizer_dir: str) -> None:
    tok = load_tokenizer(tokenizer_dir)
    prompt_ids = _bare(tokenizer_dir, PROMPT)
    max_len = len(prompt_ids) + 2 + 3  # [CLS] prompt, three caption tokens, [SEP]
    caption = CAPTIONS[1]
    assert len(_bare(tokenizer_dir, caption)) > 3
    batch = Collator(tokenizer_dir, max_len, prompts={"text": PROMPT})([{"text": caption}, {"text": "two shapes"}])
    assert batch["text_input_ids"].shape == (2, max_len)
    row = _rows(batch)[0]
    assert row == [tok.cls_token_id, *prompt_ids, *_bare(tokenizer_dir, caption)[:3], tok.sep_token_id]
    assert batch["text_prompt_length"].tolist() == [1 + len(prompt_ids)] * 2


def test_a_prompt_leaving_no_room_for_text_is_refused_naming_the_key(tokenizer_dir: str) -> None:
    fits = len(_bare(tokenizer_dir, PROMPT)) + 2  # [CLS] prompt [SEP]: no caption token would fit
    with pytest.raises(ValueError, match=r"prompts\.text.*max_len=" + str(fits)):
        Collator(tokenizer_dir, fits, prompts={"text": PROMPT})
    Collator(tokenizer_dir, fits + 1, prompts={"text": PROMPT})


def test_a_prompt_for_a_key_that_is_not_text_is_refused(tokenizer_dir: str) -> None:
    with pytest.raises(ValueError, match=r"'caption' is not a text key \(text\)"):
        Collator(tokenizer_dir, 32, prompts={"caption": PROMPT})


def test_padding_is_to_the_longest_in_the_batch(tokenizer_dir: str) -> None:
    tok = load_tokenizer(tokenizer_dir)
    collate = Collator(tokenizer_dir, 64, prompts={"text": PROMPT})
    short = collate([{"text": "a red circle"}, {"text": "two shapes"}])
    full = [1 + len(_bare(tokenizer_dir, PROMPT)) + len(_bare(tokenizer_dir, c)) + 1 for c in ("a red circle", "two shapes")]
    assert short["text_input_ids"].shape == (2, max(full)) and max(full) < 64
    assert short["text_attention_mask"].sum(1).tolist() == full
    shorter = full.index(min(full))
    assert short["text_input_ids"][shorter, min(full):].eq(tok.pad_token_id).all()
    assert short["text_attention_mask"][shorter, min(full):].eq(0).all()
    # A longer batch is wider: the width follows the batch, not max_len.
    assert collate([{"text": c} for c in CAPTIONS])["text_input_ids"].shape[1] > max(full)


def test_no_prompt_leaves_the_batch_unchanged(tokenizer_dir: str) -> None:
    tok = load_tokenizer(tokenizer_dir)
    samples = [{"text": c, "label": i, "image": torch.zeros(3, 2, 2)} for i, c in enumerate(CAPTIONS)]
    for collate in (Collator(tokenizer_dir, 8), Collator(tokenizer_dir, 8, prompts={}), Collator(tokenizer_dir, 8, prompts=None)):
        batch = collate(samples)
        expected = tok(CAPTIONS, padding="longest", truncation=True, max_length=8, return_tensors="pt")
        assert set(batch) == {"text_input_ids", "text_attention_mask", "label", "image"}
        assert torch.equal(batch["text_input_ids"], expected["input_ids"])
        assert torch.equal(batch["text_attention_mask"], expected["attention_mask"])
        assert batch["text_input_ids"].shape[1] == 8  # the longest caption is truncated
        assert batch["label"].tolist() == [0, 1, 2] and batch["image"].shape == (3, 3, 2, 2)


def test_an_empty_prompt_gives_the_unprompted_ids(tokenizer_dir: str) -> None:
    samples = [{"text": c} for c in CAPTIONS]
    plain = Collator(tokenizer_dir, 8)(samples)
    empty = Collator(tokenizer_dir, 8, prompts={"text": ""})(samples)
    assert torch.equal(empty["text_input_ids"], plain["text_input_ids"])
    assert torch.equal(empty["text_attention_mask"], plain["text_attention_mask"])
    assert empty["text_prompt_length"].tolist() == [1, 1, 1]


def test_only_the_prompted_key_changes(tokenizer_dir: str) -> None:
    samples = [{"text": c, "question": "what shape is it"} for c in CAPTIONS]
    plain = Collator(tokenizer_dir, 32, text_keys=("text", "question"))(samples)
    prompted = Collator(tokenizer_dir, 32, text_keys=("text", "question"), prompts={"question": "question: "})(samples)
    assert torch.equal(prompted["text_input_ids"], plain["text_input_ids"]) and "text_prompt_length" not in prompted
    assert prompted["question_input_ids"].shape[1] > plain["question_input_ids"].shape[1]
    assert prompted["question_prompt_length"].tolist() == [1 + len(_bare(tokenizer_dir, "question: "))] * 3


def test_collator_with_prompts_pickles_for_loader_workers(tokenizer_dir: str) -> None:
    collate = Collator(tokenizer_dir, 16, prompts={"text": PROMPT})
    clone = pickle.loads(pickle.dumps(collate))
    samples = [{"text": c} for c in CAPTIONS]
    a, b = collate(samples), clone(samples)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_data_prompts_reach_the_training_batches(tmp_path: Path) -> None:
    """`+data.prompts.text=...` in a recipe: the task's loader prefixes every caption and reports how
    many tokens the prefix took."""
    from hydra.utils import instantiate

    from vlforge.core.distributed import DistEnv
    from vlforge.datasets.prepare import prepare_data

    overrides = [f"data.demo.root={tmp_path}/demo", "data.demo.num_train=16", "data.demo.num_val=8",
                 "data.demo.num_test=8", "data.demo.samples_per_shard=8", "data.batch_size=4", "data.num_workers=0"]
    cfg = compose_recipe("clip_demo", overrides + ["+data.prompts.text='a picture of '"])
    run = validate_config(cfg)
    assert run.data.prompts == {"text": "a picture of "}
    assert validate_config(compose_recipe("clip_demo")).data.prompts == {}
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                  master_port=0, launcher="python")
    prepare_data(run.data, env)
    batch = next(iter(instantiate(cfg.task, _convert_="all").train_loader(run.data, env, seed=0)))
    tok = load_tokenizer(run.data.tokenizer)
    prefix = [tok.cls_token_id] + tok("a picture of", add_special_tokens=False).input_ids
    assert batch["text_prompt_length"].tolist() == [len(prefix)] * 4
    assert batch["text_input_ids"][:, : len(prefix)].tolist() == [prefix] * 4


def test_texts_listed_per_sample_are_flattened_with_their_sample_index(tokenizer_dir: str) -> None:
    # Every question of an image in one sample: the texts are flattened, each knowing its image row.
    samples = [{"image": torch.zeros(3), "question": ["what shape is it", "two shapes"], "answer": ["a red circle", "2"]},
               {"image": torch.ones(3), "question": ["what shape is it"], "answer": ["a circle"]}]
    batch = Collator(tokenizer_dir, 32, text_keys=("question", "answer"))(samples)
    assert batch["image"].shape == (2, 3)
    assert batch["question_sample_index"].tolist() == [0, 0, 1]
    assert batch["answer_sample_index"].tolist() == [0, 0, 1]
    assert _rows(batch, "question")[1][1:-1] == _bare(tokenizer_dir, "two shapes")
    assert _rows(batch, "answer")[2][1:-1] == _bare(tokenizer_dir, "a circle")
