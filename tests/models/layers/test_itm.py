"""ITM training pairs: the aligned rows, then a hard negative text per image and a hard negative image
per text, drawn in proportion to similarity and never among the positives."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlforge.models.layers.itm import hard_negative_pairs, itm_loss, sample_hard_negatives


def test_pairs_are_positives_then_negative_texts_then_negative_images() -> None:
    sim = torch.tensor([[5.0, 4.0, -9.0], [-9.0, 5.0, 4.0], [4.0, -9.0, 5.0]])
    pairs = hard_negative_pairs(sim, generator=torch.Generator().manual_seed(0))
    # With a 13-logit gap the draw is all but certain: the similar wrong column, the similar wrong row.
    assert pairs.image_rows.tolist() == [0, 1, 2, 0, 1, 2, 2, 0, 1]
    assert pairs.text_rows.tolist() == [0, 1, 2, 1, 2, 0, 0, 1, 2]
    assert pairs.labels.tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_pairs_draw_texts_then_images_from_one_generator() -> None:
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(1))
    same = torch.zeros(6, 6, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    pairs = hard_negative_pairs(sim, positives=same, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    neg_text, neg_image = sample_hard_negatives(sim, gen, same), sample_hard_negatives(sim.t(), gen, same)
    assert pairs.text_rows[6:12].tolist() == neg_text.tolist()
    assert pairs.image_rows[12:].tolist() == neg_image.tolist()
    negatives = list(zip(pairs.image_rows[6:].tolist(), pairs.text_rows[6:].tolist()))
    assert all(i != t and not same[i, t] for i, t in negatives)


def test_itm_loss_is_the_cross_entropy_of_the_pairs_labels() -> None:
    pairs = hard_negative_pairs(torch.eye(2))
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0], [3.0, 0.0], [0.5, 0.0], [0.0, 0.0], [2.0, 1.0]])
    expected = -(F.log_softmax(logits, dim=1)[torch.arange(6), torch.tensor([1, 1, 0, 0, 0, 0])]).mean()
    assert torch.allclose(itm_loss(logits, pairs), expected)
