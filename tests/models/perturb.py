"""Reference weights away from their initial values, for parity tests."""
from __future__ import annotations

import torch
from torch import nn


def noisy(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """`module` with Gaussian noise of std `scale` added to every parameter, in eval mode. Freshly built,
    every LayerNorm is weight 1 and bias 0 and many biases are 0: a converter that swaps two LayerNorms,
    drops a bias or maps a weight onto the wrong one of two equal-valued tensors passes a parity test
    against such a model; against a perturbed one it cannot."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():  # tied parameters are listed once and stay tied
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return module.eval()
