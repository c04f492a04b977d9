"""Text towers built here: pre-norm transformer blocks with fused QKV and SDPA attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer
from torch import nn

from vlforge.models.layers.init import NormalEmbedding


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and attn_mask is None,
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


# quick_gelu (x * sigmoid(1.702 x)): the activation OpenAI's CLIP weights were trained with; timm's,
# as the image towers take it through `act_layer`.
ACTIVATIONS = ("gelu", "quick_gelu")


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, act: str = "gelu") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"text act={act!r}: expected one of {', '.join(ACTIVATIONS)}")
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), get_act_layer(act)(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask, causal)
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """Token + learned position embeddings, `layers` blocks, final norm; pooled at CLS or the last token.

    `pool="cls"` (bidirectional, BERT-style tokenizers that start with [CLS]) or `pool="last"` (causal,
    the last non-pad token, as OpenAI CLIP pools at EOT). `act`: the MLP's activation, `gelu` or
    `quick_gelu` (OpenAI's CLIP weights).
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        max_len: int = 77,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pool: str = "cls",
        pad_token_id: int = 0,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        if pool not in ("cls", "last"):
            raise ValueError(f"pool must be 'cls' or 'last', got {pool!r}")
        self.pool, self.causal, self.max_len, self.width = pool, pool == "last", max_len, width
        self.token_embedding = NormalEmbedding(vocab_size, width, padding_idx=pad_token_id, std=0.02)
        self.position_embedding = NormalEmbedding(max_len, width, std=0.01)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, act) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"text of {length} tokens is longer than the tower's max_len {self.max_len}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        keep = attention_mask.bool()[:, None, None, :]  # [B,1,1,L]: which keys a query may attend to
        if self.causal:
            keep = keep & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        # Every query may attend to itself: a row of padding only would otherwise attend to nothing and
        # give NaN (softmax over no key). Real queries already see themselves, so they are unchanged.
        keep = keep | torch.eye(length, dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, keep, causal=False)
        tokens = self.norm(x)
        if self.pool == "cls":
            pooled = tokens[:, 0]
        else:
            last = (attention_mask.long().sum(dim=1) - 1).clamp(min=0)  # padding only: its first token
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
        return pooled, tokens
