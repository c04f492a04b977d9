"""Fusion of text with image features: cross-attention blocks, a text encoder that fuses on a schedule
(every k-th layer; one image scale for all, or one scale per depth). BLIP-2's Q-Former is in qformer.py.

Every choice is a constructor argument, so a YAML switch selects it:
  fusion: {kind: cross | gated, norm: pre | post, residual: true, every: 1, hierarchical: false}
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.models.layers.init import NormalEmbedding
from vlforge.models.layers.transformer import Block


class CrossAttention(nn.Module):
    """Queries from `x`, keys/values from `context` (another width allowed); SDPA."""

    def __init__(self, width: int, context_width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(context_width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q = self.query(x).view(batch, length, self.heads, -1).transpose(1, 2)
        k, v = (t.view(batch, context.shape[1], self.heads, -1).transpose(1, 2)
                for t in self.key_value(context).chunk(2, dim=-1))
        mask = None if context_mask is None else context_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class FusionBlock(nn.Module):
    """Cross-attention then a feed-forward, each wrapped by the chosen norm placement and residual.

    kind="gated" scales both branches by tanh of a learned scalar initialised at 0 (Flamingo): the
    block starts as the identity, so it can be added to a pretrained text model without disturbing it.
    """

    def __init__(self, width: int, context_width: int, heads: int, kind: str = "cross", norm: str = "pre",
                 residual: bool = True, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if kind not in ("cross", "gated"):
            raise ValueError(f"fusion kind must be 'cross' or 'gated', got {kind!r}")
        if norm not in ("pre", "post"):
            raise ValueError(f"fusion norm must be 'pre' or 'post', got {norm!r}")
        if kind == "gated" and not residual:
            raise ValueError("gated fusion needs residual=true (the gate scales a residual branch)")
        self.norm_placement, self.residual = norm, residual
        self.attn_norm, self.mlp_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CrossAttention(width, context_width, heads)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.gates = nn.Parameter(torch.zeros(2)) if kind == "gated" else None

    def _branch(self, x: torch.Tensor, index: int, norm: nn.LayerNorm, fn, residual: bool) -> torch.Tensor:
        if self.norm_placement == "pre":
            out = fn(norm(x))
            if self.gates is not None:
                out = torch.tanh(self.gates[index]) * out
            return x + out if residual else out
        out = fn(x)
        return norm(x + out) if residual else norm(out)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        # residual=False drops the skip around the cross-attention only: the text then continues as
        # what it read from the image (its queries carry the text), and the feed-forward keeps its skip.
        x = self._branch(x, 0, self.attn_norm, lambda h: self.attn(h, context, context_mask), self.residual)
        return self._branch(x, 1, self.mlp_norm, self.mlp, True)


class FusionTextEncoder(nn.Module):
    """Text self-attention blocks with a FusionBlock after every `every`-th one.

    `context` is one image token tensor, or a list of them (scales, finest first). With
    `hierarchical=True` the fusion blocks spread over the scales in order of depth (lower layers
    read finer scales); otherwise every fusion block reads the last (coarsest) one.
    """

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, context_width: int, max_len: int = 64,
                 every: int = 1, kind: str = "cross", norm: str = "pre", residual: bool = True,
                 hierarchical: bool = False, pad_token_id: int = 0) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"fusion every must be >= 1, got {every}")
        self.width, self.hierarchical = width, hierarchical
        self.token_embedding = NormalEmbedding(vocab_size, width, padding_idx=pad_token_id)
        self.position_embedding = NormalEmbedding(max_len, width, std=0.01)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.fusion_at = [i for i in range(layers) if (i + 1) % every == 0]
        self.fusions = nn.ModuleList(FusionBlock(width, context_width, heads, kind, norm, residual) for _ in self.fusion_at)
        self.norm = nn.LayerNorm(width)

    def _scale_for(self, fusion_index: int, scales: int) -> int:
        if not self.hierarchical:
            return scales - 1
        return min(scales - 1, fusion_index * scales // max(1, len(self.fusion_at)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                context: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        scales = [context] if isinstance(context, torch.Tensor) else list(context)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        keep = attention_mask.bool()[:, None, None, :]
        fusion_index = 0
        for i, block in enumerate(self.blocks):
            x = block(x, keep, causal=False)
            if i in self.fusion_at:
                x = self.fusions[fusion_index](x, scales[self._scale_for(fusion_index, len(scales))])
                fusion_index += 1
        return self.norm(x)
