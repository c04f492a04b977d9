"""Image-text matching: hard negatives drawn in proportion to their contrastive similarity."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sample_hard_negatives(logits: torch.Tensor, generator: torch.Generator | None = None,
                          positives: torch.Tensor | None = None) -> torch.Tensor:
    """For each row, a column other than its own, drawn with probability softmax(logits).

    Harder negatives (more similar, yet wrong) are drawn more often, as in ALBEF/BLIP ITM training;
    the logits are the contrastive ones (similarity times the logit scale, LAVIS's `sim / temp`):
    softmax of a bare cosine in [-1, 1] is near uniform, and draws mostly easy negatives.
    `positives` [rows, cols] bool marks further columns that are no negatives (an identical text:
    LAVIS masks by `idx` likewise); a row with no other column left falls back to any other.
    """
    weights = logits.float().softmax(dim=1).clone()
    if positives is not None:
        weights = weights.masked_fill(positives, 0)
    weights.fill_diagonal_(0)
    weights = weights + 1e-12 * (1 - torch.eye(*weights.shape, device=weights.device))  # never all-zero rows
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


@dataclass
class MatchingPairs:
    """The rows of one ITM step, as indices into the batch: the B aligned pairs, then each image with a
    hard negative text, then each text with a hard negative image (`labels` 1, 0, 0)."""
    image_rows: torch.Tensor  # [3B]
    text_rows: torch.Tensor  # [3B]
    labels: torch.Tensor  # [3B]


@torch.no_grad()
def hard_negative_pairs(logits_i2t: torch.Tensor, positives: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> MatchingPairs:
    """ITM's training pairs from the image-to-text contrastive logits [B, B] of a batch (ALBEF, BLIP,
    BLIP-2; similarity times the logit scale): one negative text per image and one negative image per
    text, drawn by `sample_hard_negatives`. `positives` [B, B] (symmetric) marks pairs that are no negatives."""
    neg_text = sample_hard_negatives(logits_i2t, generator, positives)
    neg_image = sample_hard_negatives(logits_i2t.t(), generator, None if positives is None else positives.t())
    rows = torch.arange(logits_i2t.shape[0], device=logits_i2t.device)
    labels = torch.cat([torch.ones_like(rows), torch.zeros_like(rows), torch.zeros_like(rows)])
    return MatchingPairs(torch.cat([rows, rows, neg_image]), torch.cat([rows, neg_text, rows]), labels)


def itm_loss(logits: torch.Tensor, pairs: MatchingPairs) -> torch.Tensor:
    """Cross-entropy of the [3B, 2] match logits of `pairs`, in fp32."""
    return F.cross_entropy(logits.float(), pairs.labels.to(logits.device))
