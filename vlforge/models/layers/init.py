"""Layers that initialise themselves in their own constructor.

Under ZeRO-3, `deepspeed.zero.Init` partitions a module's parameters as soon as that module's
`__init__` returns; an initialisation the parent applies afterwards (`nn.init.normal_(child.weight)`)
touches an empty placeholder and is silently lost. These layers do it inside `reset_parameters`,
which their own constructor calls.
"""
from __future__ import annotations

from torch import nn


class NormalLinear(nn.Linear):
    """Weights ~ N(0, std), bias zero (BERT's initialisation)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02) -> None:
        self.std = std
        super().__init__(in_features, out_features, bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class NormalEmbedding(nn.Embedding):
    """Rows ~ N(0, std); the padding row, if any, zero."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, std: float = 0.02) -> None:
        self.std = std
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)
        self._fill_padding_idx_with_zero()
