"""The dual encoders' shared feature API: texts as strings go through the model's own tokenizer."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from vlforge.datasets.demo_tokenizer import save_wordpiece_tokenizer
from vlforge.models.layers.contrastive import DualEncoderFeatures


class _IdsAsEmbeddings(nn.Module, DualEncoderFeatures):
    """Its text 'embedding' is the masked token ids themselves, so a test can read what was encoded."""

    def __init__(self, tokenizer_name: str | None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        if tokenizer_name is not None:
            self.tokenizer_name = tokenizer_name

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return image.flatten(1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (input_ids * attention_mask).float() * self.scale


def test_text_strings_are_tokenized_with_the_model_s_tokenizer_and_cut_at_max_len(tmp_path) -> None:
    texts = ["a red circle left of a blue square", "a square"]
    save_wordpiece_tokenizer(texts, 64, tmp_path)
    model = _IdsAsEmbeddings(str(tmp_path))
    out = model.extract_features({"text_input": texts}, mode="text", max_text_len=5)
    expected = AutoTokenizer.from_pretrained(str(tmp_path))(texts, padding="longest", truncation=True, max_length=5,
                                                             return_tensors="pt")
    assert torch.equal(out["text_embeds"], (expected["input_ids"] * expected["attention_mask"]).float())
    assert out["text_embeds"].shape == (2, 5)


def test_text_strings_without_a_tokenizer_are_refused_by_name() -> None:
    with pytest.raises(ValueError) as info:
        _IdsAsEmbeddings(None).extract_features({"text_input": ["a square"]}, mode="text")
    assert str(info.value) == ("_IdsAsEmbeddings was built without a tokenizer: pass text_input_ids and "
                               "text_attention_mask, or build it with tokenizer=<directory or hub id>")
