"""BLIP retrieval loaded from transformers' BlipForImageTextRetrieval: same ITC and ITM scores."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from tests.models.perturb import noisy
from tests.models.tiny_blip import TEXT, VISION, VOCAB, hf_config, images
from vlforge.models.blip.convert import blip_retrieval_from_hf
from vlforge.models.blip.retrieval import BlipRetrieval
from vlforge.models.layers.convert import load_mapped
from vlforge.models.layers.itm import hard_negative_pairs, sample_hard_negatives

EMBED = 16


@pytest.fixture(scope="module")
def pair() -> tuple[BlipForImageTextRetrieval, BlipRetrieval]:
    torch.manual_seed(0)
    hf = noisy(BlipForImageTextRetrieval(hf_config(image_text_hidden_size=EMBED)), seed=0)
    ours = BlipRetrieval(VISION, TEXT, embed_dim=EMBED).eval()
    load_mapped(ours, blip_retrieval_from_hf(hf.state_dict()), ignore=("logit_scale",))
    return hf, ours


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    pixels, normalised = images(3, seed=5)
    ids = torch.randint(3, VOCAB, (3, 8), generator=gen)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    ids[2, 5:] = 0
    return pixels, normalised, ids, mask


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


def test_training_losses_are_the_contrastive_and_matching_cross_entropies(pair, monkeypatch) -> None:
    from vlforge.models.blip import retrieval

    _, ours = pair
    pixels, _, ids, mask = _batch()
    drawn = []
    monkeypatch.setattr(retrieval, "hard_negative_pairs",
                        lambda logits, **kw: drawn.append(hard_negative_pairs(logits, **kw)) or drawn[-1])
    with torch.no_grad():
        out = ours({"image": pixels, "text_input_ids": ids, "text_attention_mask": mask})
        image_tokens, image_emb = ours.image_features(pixels)
        logits = ours.logit_scale() * image_emb @ ours.encode_text(ids, mask).t()
        pairs = drawn[0]
        itm_logits = ours.itm_logits(image_tokens[pairs.image_rows], ids[pairs.text_rows], mask[pairs.text_rows])
    # Image i goes with text i, both ways; then the 3 aligned pairs are "match" (1), the 6 drawn ones not.
    itc = 0.5 * (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3)))
    assert pairs.labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    itm = F.cross_entropy(itm_logits, torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(out.losses["itc"], itc)
    torch.testing.assert_close(out.losses["itm"], itm)
    torch.testing.assert_close(out.loss, itc + itm)
    assert out.losses["itm"] > 0.1 and out.losses["itc"] > 0.1  # neither term is trivially zero


def test_itm_negatives_are_drawn_from_the_itc_logits(pair, monkeypatch) -> None:
    # LAVIS draws them from softmax(sim / temp): a bare cosine would make the draw near uniform.
    from vlforge.models.blip import retrieval

    _, ours = pair
    pixels, _, ids, mask = _batch()
    seen = []
    monkeypatch.setattr(retrieval, "hard_negative_pairs",
                        lambda logits, **kw: seen.append(logits) or hard_negative_pairs(logits, **kw))
    with torch.no_grad():
        ours({"image": pixels, "text_input_ids": ids, "text_attention_mask": mask})
        _, image_emb = ours.image_features(pixels)
        expected = ours.logit_scale() * image_emb @ ours.encode_text(ids, mask).t()
    assert ours.logit_scale() > 10
    torch.testing.assert_close(seen[0], expected)


def test_hard_negatives_are_never_the_positive_and_prefer_similar() -> None:
    sim = torch.tensor([[5.0, 4.0, -9.0], [0.0, 5.0, 0.0], [-9.0, 4.0, 5.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, gen) for _ in range(200)])
    assert (draws != torch.arange(3)).all()
    assert (draws[:, 0] == 1).float().mean() > 0.95  # row 0: column 1 is far more similar than column 2


def test_hard_negatives_skip_identical_texts() -> None:
    # Column 1 is row 0's most similar, but its text reads like row 0's: it is no negative.
    sim = torch.tensor([[5.0, 4.9, 0.0, -1.0], [4.9, 5.0, 0.0, -1.0], [0.0, 0.0, 5.0, 1.0], [-1.0, -1.0, 1.0, 5.0]])
    same = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, gen, positives=same) for _ in range(200)])
    assert not same[torch.arange(4), draws].any()
