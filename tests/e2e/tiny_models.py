"""Models for trainer tests whose loss is a mean over samples (contrastive losses are not)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from vlforge.models.output import ModelOutput


class MeanColourRegressor(nn.Module):
    """Predicts a caption's token count from the image's pooled colour: a per-sample squared error."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.register_buffer("dummy", torch.zeros(1), persistent=False)

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        pooled = batch["image"].float().mean(dim=(2, 3)) / 255.0
        target = batch["text_attention_mask"].float().sum(dim=1, keepdim=True) / 10.0
        loss = (self.net(pooled) - target).pow(2).mean()
        return ModelOutput(loss=loss, losses={"mse": loss.detach()})
