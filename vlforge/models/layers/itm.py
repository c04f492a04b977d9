"""Image-text matching: hard negatives drawn in proportion to their contrastive similarity."""
from __future__ import annotations

import torch


def sample_hard_negatives(sim: torch.Tensor, generator: torch.Generator | None = None,
                          positives: torch.Tensor | None = None) -> torch.Tensor:
    """For each row, a column other than its own, drawn with probability softmax(similarity).

    Harder negatives (more similar, yet wrong) are drawn more often, as in ALBEF/BLIP ITM training.
    `positives` [rows, cols] bool marks further columns that are no negatives (an identical text:
    LAVIS masks by `idx` likewise); a row with no other column left falls back to any other.
    """
    weights = sim.float().softmax(dim=1).clone()
    if positives is not None:
        weights = weights.masked_fill(positives, 0)
    weights.fill_diagonal_(0)
    weights = weights + 1e-12 * (1 - torch.eye(*weights.shape, device=weights.device))  # never all-zero rows
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)
