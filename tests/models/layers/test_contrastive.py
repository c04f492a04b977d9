"""The dual encoders' shared feature API: texts as strings go through the model's own tokenizer."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from vlforge.datasets.demo_tokenizer import save_wordpiece_tokenizer
from vlforge.models.layers.contrastive import DualEncoderFeatures, contrastive_loss, image_text_similarity


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


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_an_image_with_several_query_embeddings_scores_its_best_query() -> None:
    images, texts = _unit(3, 4, 8, seed=0), _unit(5, 8, seed=1)  # BLIP-2: 4 query outputs per image
    expected = torch.tensor([[max(float(q @ t) for q in image) for t in texts] for image in images])
    torch.testing.assert_close(image_text_similarity(images, texts), expected)
    torch.testing.assert_close(image_text_similarity(images[:, 0], texts), images[:, 0] @ texts.t())


@pytest.mark.parametrize("with_groups", [False, True])
def test_label_smoothing_spreads_its_share_over_every_column(with_groups: bool) -> None:
    images, texts, scale, smoothing = _unit(4, 8, seed=2), _unit(4, 8, seed=3), torch.tensor(5.0), 0.1
    groups = torch.arange(4) if with_groups else None  # distinct groups: the plain targets, the soft-target path
    loss = contrastive_loss(images, texts, scale, groups=groups, label_smoothing=smoothing)
    target = torch.full((4, 4), smoothing / 4) + torch.eye(4) * (1 - smoothing)
    by_hand = 0.5 * sum(-(torch.log_softmax(logits, dim=1) * target).sum(dim=1).mean()
                        for logits in (scale * images @ texts.t(), scale * texts @ images.t()))
    torch.testing.assert_close(loss, by_hand)
