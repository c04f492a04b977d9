"""LAVIS's ALBEF checkpoints through `load_model(..., checkpoint=<.pth>)` give LAVIS's outputs: tiny
models built and run by LAVIS 1.0.2 itself (tests/fixtures/lavis/make_fixtures.py), compared at 1e-5 on
floats and exactly on answers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models.lavis_fixtures import TOL, expected, tiny_overrides, weights
from vlforge import load_model
from vlforge.core.tokenizers import load_tokenizer
from vlforge.tasks.itm_rerank import itm_rerank

# ALBEF fuses the image from layer 6 of 12; the fixtures' 2-layer encoders from layer 1.
_TINY = [*tiny_overrides(vocab_extra=0, embed=True), "++model.fusion_layer=1", "++model.queue_size=8"]


@pytest.fixture(autouse=True)
def _offline_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLFORGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tokens(model, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = load_tokenizer(model.tokenizer_name)(texts, padding="longest", truncation=True, max_length=max_len,
                                                   return_tensors="pt")
    return encoded.input_ids, encoded.attention_mask


def test_retrieval_similarities_and_lavis_retrieval_scores() -> None:
    ref = expected("albef_retrieval")
    model = load_model("albef_retrieval", "coco", checkpoint=weights("albef_retrieval"), overrides=_TINY)
    ids, mask = _tokens(model, ref["texts"], 35)
    with torch.no_grad():
        tokens, image_emb = model.image_features(ref["pixels"])
        sim = image_emb @ model.encode_text(ids, mask).t()
    torch.testing.assert_close(sim, ref["itc_similarity"], **TOL)
    i2t, t2i = itm_rerank(model, sim, list(tokens), ref["texts"], load_tokenizer(model.tokenizer_name), 35,
                          ref["k_test"], torch.device("cpu"))
    for ours, theirs in ((i2t, ref["scores_i2t"]), (t2i, ref["scores_t2i"])):
        ranked = theirs > -100  # LAVIS fills the rest of each row with -100
        assert torch.equal(ranked, ours > -100)
        torch.testing.assert_close(ours[ranked], theirs[ranked], **TOL)


def test_vqa_answers_ranked() -> None:
    ref = expected("albef_vqa")
    model = load_model("albef_vqa", "vqav2", checkpoint=weights("albef_vqa"),
                       overrides=[*tiny_overrides(vocab_extra=0), "++model.fusion_layer=1", "++model.decoder_layers=1"])
    ids, mask = _tokens(model, ref["questions"], 35)
    answers, answer_mask = _tokens(model, ref["answer_list"], 35)
    for k, key in ((len(ref["answer_list"]), "ranked_answers"), (3, "ranked_answers_top3")):
        best = model.rank_answers(ref["pixels"], ids, mask, answers, answer_mask, k=k)
        assert [ref["answer_list"][i] for i in best] == ref[key], key


def test_feature_extractor_features() -> None:
    ref = expected("albef_feature_extractor")
    model = load_model("albef_feature_extractor", "base", checkpoint=weights("albef_feature_extractor"),
                       overrides=_TINY)
    features = model.extract_features({"image": ref["pixels"], "text_input": ref["texts"]}, max_text_len=30)
    torch.testing.assert_close(features["image_embeds"], ref["image_embeds_proj"][:, 0], **TOL)
    torch.testing.assert_close(features["text_embeds"], ref["text_embeds_proj"][:, 0], **TOL)
