"""What every model's forward returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch


@dataclass
class ModelOutput:
    loss: torch.Tensor  # scalar the engine backpropagates
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # named parts, logged separately
    extras: Dict[str, Any] = field(default_factory=dict)
