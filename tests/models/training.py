"""A few optimiser steps on one batch, for the tests that show every loss part of a model learns."""
from __future__ import annotations

from typing import Any, Mapping

import torch


def loss_parts_before_and_after(model: torch.nn.Module, batch: Mapping[str, Any], steps: int = 30,
                                lr: float = 1e-3) -> tuple[dict[str, float], dict[str, float]]:
    """(loss parts at the first step, loss parts after `steps` AdamW steps on the trainable parameters)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    first: dict[str, float] = {}
    for _ in range(steps):
        out = model(batch)
        first = first or {k: v.item() for k, v in out.losses.items()}
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    return first, {k: v.item() for k, v in model(batch).losses.items()}
