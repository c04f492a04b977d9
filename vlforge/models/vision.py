"""Image towers: any timm backbone by name, fed uint8 pixels and normalised inside the model."""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PixelNormalize(nn.Module):
    """uint8 [B,3,H,W] -> normalised float; the loaders ship uint8 so workers move 4x fewer bytes."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # The buffers follow the engine's dtype (bf16/fp16/fp32), so the tower sees its own dtype.
        return pixels.to(self.scale.dtype) * self.scale - self.shift


class TimmVisionTower(nn.Module):
    """A timm backbone without its classifier; `forward` gives (pooled [B,D], tokens [B,N,D]).

    For ViTs, pooled is the CLS token (timm's default `global_pool="token"`) and tokens include it.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool | str = False,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        norm_eps: float | None = None,
        **timm_kwargs: Any,
    ) -> None:
        """`norm_eps` sets the LayerNorm epsilon of ViT-style backbones (BLIP and HF ViTs use 1e-5,
        timm's default is 1e-6); other keyword arguments go to `timm.create_model`."""
        super().__init__()
        if norm_eps is not None:
            timm_kwargs["norm_layer"] = partial(nn.LayerNorm, eps=norm_eps)
        pretrained_file = pretrained if isinstance(pretrained, str) else None
        self.normalize = PixelNormalize(mean, std)
        self.backbone = timm.create_model(
            name,
            pretrained=bool(pretrained),
            pretrained_cfg_overlay=dict(file=pretrained_file) if pretrained_file else None,
            num_classes=0,
            **timm_kwargs,
        )
        self.width: int = self.backbone.num_features

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, D], tokens [B, N, D]); a convolutional map [B, D, H, W] becomes H*W tokens."""
        features = self.backbone.forward_features(self.normalize(pixels))
        pooled = self.backbone.forward_head(features, pre_logits=True)
        tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
        return pooled, tokens


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
        maps = self.backbone.forward_intermediates(self.normalize(pixels), indices=self.layers, intermediates_only=True)
        pyramid: list[torch.Tensor] = []
        above: torch.Tensor | None = None
        for lateral, feature in reversed(list(zip(self.lateral, maps))):
            level = lateral(feature)
            if above is not None:
                level = level + F.interpolate(above, size=level.shape[-2:], mode="nearest")
            pyramid.append(level)
            above = level
        return [level.flatten(2).transpose(1, 2) for level in reversed(pyramid)]
