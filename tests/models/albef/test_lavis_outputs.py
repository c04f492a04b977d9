"""LAVIS's ALBEF checkpoints through `load_model(..., checkpoint=<.pth>)` give LAVIS's outputs: tiny
models built and run by LAVIS 1.0.2 itself (tests/fixtures/lavis/make_fixtures.py), compared at 1e-5 on
floats and exactly on answers."""
from __future__ import annotations

import pytest
import torch

from tests.models.lavis_fixtures import (  # noqa: F401 - offline_home is a fixture
    TOL,
    assert_ranked_answers,
    assert_retrieval_matches,
    expected,
    offline_home,
    tiny_overrides,
    tokens,
    weights,
)
from vlforge import load_model

# ALBEF fuses the image from layer 6 of 12; the fixtures' 2-layer encoders from layer 1.
_TINY = [*tiny_overrides(vocab_extra=0, embed=True), "++model.fusion_layer=1", "++model.queue_size=8"]


pytestmark = pytest.mark.usefixtures("offline_home")


def test_retrieval_similarities_and_lavis_retrieval_scores() -> None:
    ref = expected("albef_retrieval")
    model = load_model("albef_retrieval", "coco", checkpoint=weights("albef_retrieval"), overrides=_TINY)
    assert_retrieval_matches(model, ref)


def test_vqa_answers_ranked() -> None:
    ref = expected("albef_vqa")
    model = load_model("albef_vqa", "vqav2", checkpoint=weights("albef_vqa"),
                       overrides=[*tiny_overrides(vocab_extra=0), "++model.fusion_layer=1", "++model.decoder_layers=1"])
    assert_ranked_answers(model, ref)


def test_feature_extractor_features() -> None:
    ref = expected("albef_feature_extractor")
    model = load_model("albef_feature_extractor", "base", checkpoint=weights("albef_feature_extractor"),
                       overrides=_TINY)
    features = model.extract_features({"image": ref["pixels"], "text_input": ref["texts"]}, max_text_len=30)
    torch.testing.assert_close(features["image_embeds"], ref["image_embeds_proj"][:, 0], **TOL)
    torch.testing.assert_close(features["text_embeds"], ref["text_embeds_proj"][:, 0], **TOL)


def test_classification_logits() -> None:
    ref = expected("albef_classification")
    model = load_model("albef_classification", "ve", checkpoint=weights("albef_classification"),
                       overrides=[*tiny_overrides(vocab_extra=0), "++model.fusion_layer=1"])
    logits = model.predict({"image": ref["pixels"], "text_input": ref["texts"]})["predictions"]
    torch.testing.assert_close(logits, ref["logits"], **TOL)
    assert logits.argmax(dim=1).tolist() == ref["logits"].argmax(dim=1).tolist()
    # Training: the cross-entropy of those logits against the batch's labels.
    ids, mask = tokens(model, ref["texts"], 40)
    labels = torch.tensor([2, 0, 1])
    loss = model({"image": ref["pixels"], "text_input_ids": ids, "text_attention_mask": mask, "label": labels}).loss
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(ref["logits"], labels), **TOL)
