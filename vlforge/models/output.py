"""What every model's forward returns."""
from __future__ import annotations

from typing import Any, Dict

import torch


class ModelOutput(dict):
    """`loss` (the scalar the engine backpropagates), `losses` (named parts, logged separately), `extras`.

    A dict, not a dataclass: DeepSpeed ZeRO-3 looks for the tensors of a module's output in tuples,
    lists and dicts to hook its backward pass, and replaces them in place; the attributes read the
    dict, so they see the hooked tensors.
    """

    def __init__(
        self,
        loss: torch.Tensor,
        losses: Dict[str, torch.Tensor] | None = None,
        extras: Dict[str, Any] | None = None,
    ) -> None:
        super().__init__(loss=loss, losses=dict(losses or {}), extras=dict(extras or {}))

    @property
    def loss(self) -> torch.Tensor:
        return self["loss"]

    @property
    def losses(self) -> Dict[str, torch.Tensor]:
        return self["losses"]

    @property
    def extras(self) -> Dict[str, Any]:
        return self["extras"]
