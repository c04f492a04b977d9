"""The blip2_opt zoo entries over a tiny random HF BLIP-2 (OPT LM) saved sharded by transformers, with
a tiny byte-level BPE tokenizer in OPT's files: the same logits as transformers, captions, and the
errors for a missing shard and for a T5 BLIP-2."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, GPT2TokenizerFast

from vlforge.models import load_model, load_model_and_preprocess
from vlforge.models.dimensions import blip2_dimensions
from vlforge.models.sources import WeightsNotFoundError
from tests.models.tiny_blip import images

WIDTH, QUERIES, VOCAB, IMAGE_TOKEN = 32, 4, 320, 319
TEXTS = ["a photo of a red circle", "a blue square on the left", "two green triangles"]


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VLFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "home"


def hf_blip2_config(**text: object) -> Blip2Config:
    config = Blip2Config(
        vision_config=dict(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                            encoder_hidden_size=WIDTH, cross_attention_frequency=2, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0),
        text_config={"model_type": "opt", "hidden_size": WIDTH, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "ffn_dim": 48, "vocab_size": VOCAB, "word_embed_proj_dim": WIDTH, "max_position_embeddings": 64,
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1, "dropout": 0.0, **text},
        num_query_tokens=QUERIES)
    config.image_token_id = IMAGE_TOKEN  # transformers 5 splices the queries in at this token
    return config


def save_opt_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer in the files OPT's repos ship (vocab.json, merges.txt, tokenizer.json),
    "</s>" (id 1) its bos and eos, as OPT's."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 4, vocab_size=300, min_frequency=1, special_tokens=["<pad>", "</s>", "<unk>"])
    bpe.save_model(str(directory))
    GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                      unk_token="<unk>", add_bos_token=True).save_pretrained(str(directory))


def save_hf_blip2(directory: Path) -> Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(hf_blip2_config()).eval()
    with torch.no_grad():  # off the init (zero biases, unit norms, near-uniform attention): every weight shows
        for param in hf.parameters():
            param.add_(0.1 * torch.randn_like(param))
    hf.save_pretrained(str(directory), max_shard_size="100KB")  # sharded, as the published repos are
    save_opt_tokenizer(directory)
    return hf


def test_blip2_opt_matches_transformers_and_captions(_offline_cache: Path) -> None:
    directory = _offline_cache / "models" / "blip2_opt" / "caption_coco_opt2.7b"
    hf = save_hf_blip2(directory)
    assert (directory / "model.safetensors.index.json").is_file() and not (directory / "model.safetensors").exists()
    model, vis, _ = load_model_and_preprocess("blip2_opt", "caption_coco_opt2.7b")
    assert model.prompt == "a photo of " and model.encoder.qformer.num_queries == QUERIES

    pixels, normalised = images(2, seed=3)
    tok = GPT2TokenizerFast.from_pretrained(str(directory))
    text = tok(["a photo of a red circle", "a blue square"], padding="longest", return_tensors="pt")
    ids, mask = text["input_ids"], text["attention_mask"]
    with torch.no_grad():
        embeds, full_mask = model._inputs(pixels, ids, mask)
        got = model.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, QUERIES:]
        hf_ids = torch.cat([torch.full((2, QUERIES), IMAGE_TOKEN), ids], dim=1)
        hf_mask = torch.cat([torch.ones(2, QUERIES, dtype=mask.dtype), mask], dim=1)
        expected = hf(pixel_values=normalised, input_ids=hf_ids, attention_mask=hf_mask).logits[:, QUERIES:]
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)
    # The LM head is tied to the word embeddings the file carries once (save_pretrained drops the copy).
    assert torch.equal(model.language_model.lm_head.weight, hf.language_model.lm_head.weight)

    captions = model.generate({"image": pixels}, num_beams=2, max_length=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert vis["eval"](__import__("PIL.Image").Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_blip2_opt_pretrained_type_has_no_prompt(tmp_path: Path) -> None:
    save_hf_blip2(tmp_path / "blip2")
    model = load_model("blip2_opt", "pretrain_opt2.7b", checkpoint=tmp_path / "blip2")
    assert model.prompt == "" and model.prompt_length == 1  # OPT's bos only


def test_a_missing_shard_is_named_before_anything_loads(_offline_cache: Path) -> None:
    directory = _offline_cache / "models" / "blip2_opt" / "pretrain_opt2.7b"
    save_hf_blip2(directory)
    shard = sorted(directory.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match=shard.name) as err:
        load_model("blip2_opt", "pretrain_opt2.7b")
    assert time.perf_counter() - start < 5
    assert "https://huggingface.co/Salesforce/blip2-opt-2.7b" in str(err.value)


def test_an_encoder_decoder_blip2_is_refused_by_name() -> None:
    config = Blip2Config(text_config={"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 2,
                                      "d_ff": 48, "vocab_size": 64})
    with pytest.raises(ValueError, match="t5 .*decoder-only"):
        blip2_dimensions(config)
