"""Any timm backbone as an image tower, by name: ViTs and CNNs, with the pooling and token options a
vision-language model needs."""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import timm
import torch
from torch import nn

from vlforge.models.towers.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AttentionPool,
    PixelNormalize,
    VisionTowerBase,
    check_pool,
)


def sincos_position_code(height: int, width: int, dim: int) -> torch.Tensor:
    """[height*width, dim] fixed position code, rows first: half the channels encode the row, half the
    column, each as sines and cosines at geometrically spaced frequencies (MAE's 2-D code)."""
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


class TimmVisionTower(VisionTowerBase):
    """A timm backbone without its classifier; `forward` gives (pooled [B,D], tokens [B,N,D]).

    Tokens are the backbone's final features (for ViTs, CLS and other prefix tokens included; a CNN's
    [B, D, H, W] map becomes H*W tokens). `pool` chooses pooled:
    - "default": timm's own head pooling (`global_pool`; the CLS token on a ViT), as before;
    - "cls": the first token (ViTs with a class token only);
    - "mean": the mean of the patch tokens, without the prefix (CLS, register) tokens;
    - "attention": an `AttentionPool` (a learned query) over all tokens, trained with the model.
    Freeze, dtype and gradient checkpointing: see `VisionTowerBase`.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool | str = False,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        norm_eps: float | None = None,
        pool: str = "default",
        pool_heads: int | None = None,
        freeze: bool = False,
        dtype: str | None = None,
        grad_checkpointing: bool = False,
        token_norm: bool = False,
        token_position: bool = False,
        channels_last: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        """`token_norm` puts a LayerNorm on the tokens (a ViT's end with one; a CNN's map does not).
        `token_position` adds a fixed 2-D sine-cosine code of each token's place to a CNN map's tokens
        (after `token_norm`), so text attending to them can tell where things are (ViT tokens carry
        learned position embeddings already, and the option is refused for them).
        `norm_eps` sets the LayerNorm epsilon of ViT-style backbones (BLIP and HF ViTs use 1e-5,
        timm's default is 1e-6); `pool_heads` the attention pool's heads (width // 64 by default);
        `channels_last` runs a convolutional trunk in NHWC memory order (timm's `--channels-last`):
        oneDNN's and cuDNN's convolutions are faster on it (resnet10t's training step 1.18x on CPU here);
        the values are the same. A ViT gains nothing from it.
        Other keyword arguments go to `timm.create_model`."""
        super().__init__()
        check_pool(pool)
        if norm_eps is not None:
            timm_kwargs["norm_layer"] = partial(nn.LayerNorm, eps=norm_eps)
        pretrained_file = pretrained if isinstance(pretrained, str) else None
        self.normalize = PixelNormalize(mean, std)

        def create(_: torch.dtype | None) -> nn.Module:
            return timm.create_model(
                name,
                pretrained=bool(pretrained),
                pretrained_cfg_overlay=dict(file=pretrained_file) if pretrained_file else None,
                num_classes=0,
                **timm_kwargs,
            )

        # timm loads pretrained weights after building the model: inside zero.Init they would land
        # in empty placeholders, so a pretrained trunk is built whole and partitioned by the engine.
        self.backbone = self._setup_options(freeze, dtype, create, trunk_builds_outside_zero_init=bool(pretrained))
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        # Only the input is converted: given an NHWC input the convolutions run NHWC whatever the
        # weights' order. The weights stay NCHW: DeepSpeed's parameter broadcast at initialize views
        # each one as flat bytes, which fails on a channels_last weight.
        self.channels_last = channels_last
        self.width: int = self.backbone.num_features
        self.pool = pool
        self.num_prefix_tokens: int = getattr(self.backbone, "num_prefix_tokens", 0)
        if pool == "cls" and not getattr(self.backbone, "has_class_token", self.num_prefix_tokens > 0):
            raise ValueError(f"vision pool=cls: timm model {name!r} has no class token; use mean or attention")
        self.attention_pool = AttentionPool(self.width, pool_heads) if pool == "attention" else None
        self.token_norm = nn.LayerNorm(self.width) if token_norm else None
        if token_position and self.num_prefix_tokens:
            raise ValueError(f"vision token_position: timm model {name!r} is a ViT; its tokens carry positions already")
        if token_position and self.width % 4:
            raise ValueError(f"vision token_position needs a width divisible by 4, {name!r} has {self.width}")
        self.token_position = token_position
        self._position_codes: dict[tuple, torch.Tensor] = {}  # per (grid, device, dtype): built once

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, D], tokens [B, N, D])."""
        with self.trunk_context():
            images = self.normalize(pixels).to(self.trunk_dtype())
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            features = self.backbone.forward_features(images)
            tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
            grid = features.shape[-2:] if features.ndim == 4 else None
            pooled = self.backbone.forward_head(features, pre_logits=True) if self.pool == "default" else None
        if pooled is None:
            (tokens,) = self.finish(tokens)
        else:
            pooled, tokens = self.finish(pooled, tokens)
        if self.token_norm is not None:
            tokens = self.token_norm(tokens)
        if self.token_position:
            if grid is None:  # a ViT without a class token passes the constructor's check
                raise ValueError("vision token_position: the backbone gives tokens, not a CNN map; "
                                 "its tokens carry positions already")
            key = (tuple(grid), tokens.device, tokens.dtype)
            if key not in self._position_codes:
                self._position_codes[key] = sincos_position_code(*grid, self.width).to(tokens)
            tokens = tokens + self._position_codes[key]
        if self.pool == "cls":
            pooled = tokens[:, 0]
        elif self.pool == "mean":
            # A CNN's map has no prefix tokens, so its mean is over every position.
            pooled = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.pool == "attention":
            pooled = self.attention_pool(tokens)
        return pooled, tokens
