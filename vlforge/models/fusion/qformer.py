"""BLIP-2's Q-Former: learned queries and text in one BERT-style transformer.

Queries and text share each layer's self-attention; only the queries cross-attend to the image
(every `cross_every`-th layer) and they have a feed-forward of their own. Which positions see which
is set by the attention mask, so the same weights serve BLIP-2's three stage-1 objectives:
- queries alone (image features for ITC, and the visual prefix of stage 2),
- text alone (text features for ITC),
- queries + text, bidirectional (ITM) or with text causal and queries blind to the text (ITG).
Parameter names follow HF's Blip2QFormer closely enough to map its checkpoints by key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.models.layers.bert import ACTIVATIONS, Attention, additive_mask
from vlforge.models.layers.init import NormalEmbedding, NormalLinear


class FeedForward(nn.Module):
    """BERT's post-norm feed-forward: LayerNorm(x + W2 act(W1 x))."""

    def __init__(self, width: int, intermediate: int, dropout: float, eps: float, activation: str) -> None:
        super().__init__()
        self.intermediate = NormalLinear(width, intermediate)
        self.act = ACTIVATIONS[activation]()
        self.output = NormalLinear(intermediate, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + F.dropout(self.output(self.act(self.intermediate(x))), self.dropout, self.training))


class QFormerLayer(nn.Module):
    def __init__(self, width: int, heads: int, intermediate: int, image_width: int | None, text: bool,
                 dropout: float, eps: float, activation: str) -> None:
        super().__init__()
        self.attention = Attention(width, heads, dropout=dropout, eps=eps)
        self.cross_attention = Attention(width, heads, image_width, dropout, eps) if image_width else None
        self.query_ffn = FeedForward(width, intermediate, dropout, eps, activation)
        # Stage 2 never feeds text, so a Q-Former built without text has no text feed-forward to carry.
        self.text_ffn = FeedForward(width, intermediate, dropout, eps, activation) if text else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, num_queries: int, image_tokens: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross_attention is not None:
                queries = self.cross_attention(queries, None, context=image_tokens)
            parts.append(self.query_ffn(queries))
        if text.shape[1]:
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class QFormer(nn.Module):
    """`num_queries` learned queries that read `image_width`-wide image tokens, and (unless
    `vocab_size` is None) a text embedding + text feed-forwards for stage-1 training.

    `forward` returns hidden states [B, Q + L, width]: the queries first (when image tokens are
    given), then the text (when input ids are given).
    """

    def __init__(
        self,
        image_width: int,
        num_queries: int = 32,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        intermediate: int = 3072,
        cross_every: int = 2,
        vocab_size: int | None = 30523,
        max_len: int = 512,
        dropout: float = 0.0,
        eps: float = 1e-12,
        activation: str = "gelu",
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        if cross_every < 1:
            raise ValueError(f"qformer cross_every must be >= 1, got {cross_every}")
        self.width, self.num_queries, self.max_len, self.dropout = width, num_queries, max_len, dropout
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, width) * 0.02)
        text = vocab_size is not None
        self.word_embeddings = NormalEmbedding(vocab_size, width, padding_idx=pad_token_id) if text else None
        self.position_embeddings = NormalEmbedding(max_len, width) if text else None
        # Applied to queries and text embeddings alike (BLIP-2's embedding LayerNorm).
        self.embed_norm = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(
            QFormerLayer(width, heads, intermediate, image_width if i % cross_every == 0 else None, text,
                         dropout, eps, activation)
            for i in range(layers)
        )

    def _embed(self, batch: int, input_ids: torch.Tensor | None, with_queries: bool) -> torch.Tensor:
        parts = [self.query_tokens.expand(batch, -1, -1)] if with_queries else []
        if input_ids is not None:
            if self.word_embeddings is None:
                raise ValueError("this Q-Former was built without text (qformer.vocab_size: null); it takes no input_ids")
            if input_ids.shape[1] > self.max_len:
                raise ValueError(f"{input_ids.shape[1]} text tokens exceed the Q-Former's max_len {self.max_len}")
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return F.dropout(self.embed_norm(x), self.dropout, self.training)

    def forward(
        self,
        image_tokens: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        causal_text: bool = False,
    ) -> torch.Tensor:
        """Queries take part iff `image_tokens` is given; text iff `input_ids` is. `causal_text`
        (ITG) lets each text token see all queries and the text before it, and hides the text from
        the queries, so the image reaches the text only through them."""
        if image_tokens is None and input_ids is None:
            raise ValueError("the Q-Former needs image tokens, input ids, or both")
        reference = image_tokens if image_tokens is not None else input_ids
        batch, device = reference.shape[0], reference.device
        num_queries = self.num_queries if image_tokens is not None else 0
        x = self._embed(batch, input_ids, image_tokens is not None)
        length = x.shape[1] - num_queries
        text_keep = (torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None
                     else attention_mask.bool())
        keep = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=device), text_keep], dim=1)
        keep = keep[:, None, None, :]  # [B, 1, 1, keys]
        if causal_text:
            total = num_queries + length
            query_pos = torch.arange(total, device=device)[:, None]
            key_pos = torch.arange(total, device=device)[None, :]
            is_query_key = key_pos < num_queries
            # A query sees the queries only; a text token sees the queries and the text up to itself.
            visible = torch.where(query_pos < num_queries, is_query_key, is_query_key | (key_pos <= query_pos))
            keep = keep & visible[None, None]
        mask = additive_mask(keep, x.dtype)
        for layer in self.layers:
            x = layer(x, mask, num_queries, image_tokens)
        return x
