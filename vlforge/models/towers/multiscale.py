"""A multi-scale image tower: token maps from several depths of a timm backbone, joined by a
feature-pyramid neck."""
from __future__ import annotations

from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vlforge.models.towers.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PixelNormalize


class MultiScaleVisionTower(nn.Module):
    """Token maps from several depths of a timm backbone (`forward_intermediates`), brought to one
    `width` by a feature-pyramid neck: a lateral projection per scale plus the coarser scale's output,
    upsampled, added top-down. `forward` returns [B, N_i, width] per scale, finest first."""

    def __init__(
        self,
        name: str,
        layers: Sequence[int],
        width: int,
        pretrained: bool = False,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        self.normalize = PixelNormalize(mean, std)
        self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
        self.layers, self.width = list(layers), width
        with torch.no_grad():
            size = getattr(self.backbone, "default_cfg", {}).get("input_size", (3, 224, 224))[1:]
            size = timm_kwargs.get("img_size", size)
            size = (size, size) if isinstance(size, int) else tuple(size)
            probe = self.backbone.forward_intermediates(torch.zeros(1, 3, *size), indices=self.layers,
                                                        intermediates_only=True)
        self.lateral = nn.ModuleList(nn.Conv2d(f.shape[1], width, kernel_size=1) for f in probe)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        # Cast to the backbone's dtype: a bf16/fp16 DeepSpeed engine casts parameters, not buffers.
        images = self.normalize(pixels).to(next(self.backbone.parameters()).dtype)
        maps = self.backbone.forward_intermediates(images, indices=self.layers, intermediates_only=True)
        pyramid: list[torch.Tensor] = []
        above: torch.Tensor | None = None
        for lateral, feature in reversed(list(zip(self.lateral, maps))):
            level = lateral(feature)
            if above is not None:
                level = level + F.interpolate(above, size=level.shape[-2:], mode="nearest")
            pyramid.append(level)
            above = level
        return [level.flatten(2).transpose(1, 2) for level in reversed(pyramid)]
