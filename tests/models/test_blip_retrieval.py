"""BLIP retrieval loaded from transformers' BlipForImageTextRetrieval: same ITC and ITM scores."""
from __future__ import annotations

import pytest
import torch
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipTextConfig, BlipVisionConfig

from vlforge.models.blip_retrieval import BlipRetrieval, sample_hard_negatives
from vlforge.models.convert import blip_retrieval_from_hf, load_mapped
from vlforge.models.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

VOCAB, IMAGE, PATCH, WIDTH, EMBED = 64, 32, 8, 32, 16


@pytest.fixture(scope="module")
def pair() -> tuple[BlipForImageTextRetrieval, BlipRetrieval]:
    torch.manual_seed(0)
    vision = BlipVisionConfig(hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH)
    text = BlipTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, encoder_hidden_size=WIDTH, intermediate_size=40,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40, bos_token_id=1,
                          sep_token_id=2, pad_token_id=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = BlipForImageTextRetrieval(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                              image_text_hidden_size=EMBED)).eval()
    ours = BlipRetrieval(
        vision=dict(name="vit_base_patch16_224", img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=2,
                    num_heads=4, mlp_ratio=48 / WIDTH, norm_eps=1e-5),
        text=dict(vocab_size=VOCAB, width=WIDTH, layers=2, heads=4, intermediate=40, max_len=40),
        embed_dim=EMBED,
    ).eval()
    load_mapped(ours, blip_retrieval_from_hf(hf.state_dict()), ignore=("logit_scale",))
    return hf, ours


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (3, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=gen)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    ids = torch.randint(3, VOCAB, (3, 8), generator=gen)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    ids[2, 5:] = 0
    return pixels, (pixels.float() / 255 - mean) / std, ids, mask


def test_itm_scores_match(pair) -> None:
    hf, ours = pair
    pixels, normalised, ids, mask = _batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=normalised, attention_mask=mask, use_itm_head=True).itm_score
        tokens, _ = ours.image_features(pixels)
        got = ours.itm_logits(tokens, ids, mask)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_itc_similarities_match(pair) -> None:
    hf, ours = pair
    pixels, normalised, ids, mask = _batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=normalised, attention_mask=mask, use_itm_head=False).itm_score
        feats = ours.extract_features({"image": pixels, "text_input_ids": ids, "text_attention_mask": mask})
    torch.testing.assert_close(feats["image_embeds"] @ feats["text_embeds"].t(), expected, rtol=1e-4, atol=1e-4)


def test_training_step_has_both_losses_and_gradients(pair) -> None:
    _, ours = pair
    pixels, _, ids, mask = _batch()
    ours.train()
    out = ours({"image": pixels, "text_input_ids": ids, "text_attention_mask": mask})
    out.loss.backward()
    ours.eval()
    assert set(out.losses) == {"itc", "itm"} and torch.isfinite(out.loss)
    assert ours.itm_head.weight.grad.abs().sum() > 0 and ours.logit_scale.log_scale.grad.abs().sum() > 0
    ours.zero_grad()


def test_hard_negatives_are_never_the_positive_and_prefer_similar() -> None:
    sim = torch.tensor([[5.0, 4.0, -9.0], [0.0, 5.0, 0.0], [-9.0, 4.0, 5.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, gen) for _ in range(200)])
    assert (draws != torch.arange(3)).all()
    assert (draws[:, 0] == 1).float().mean() > 0.95  # row 0: column 1 is far more similar than column 2
