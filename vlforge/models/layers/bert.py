"""BERT-style text transformers, written here: post-norm blocks with fused projections and SDPA.

One class covers what BLIP and ALBEF need: a bidirectional encoder, a causal decoder with a KV
cache, and cross-attention to image features in chosen layers. Parameter names follow the HF BERT /
BLIP-text layout closely enough that `vlforge.models.layers.convert` maps their checkpoints by key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.models.layers.decode_rows import DecodeRows
from vlforge.models.layers.init import NormalEmbedding, NormalLinear

ACTIVATIONS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


@dataclass
class LayerCache:
    """Keys/values of one layer: self-attention grows per generated token, cross-attention is fixed.
    With `rows` (continuous batching), the new keys/values are written into the rows' buffers (their
    growing tensors `slot` and `slot + 1`) instead of being concatenated."""

    self_k: torch.Tensor | None = None
    self_v: torch.Tensor | None = None
    cross_k: torch.Tensor | None = None
    cross_v: torch.Tensor | None = None
    rows: DecodeRows | None = None
    slot: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values with `k`, `v` [B, heads, new, dim] after the cached ones."""
        if self.rows is not None:
            k, v = self.rows.append_column(self.slot, k), self.rows.append_column(self.slot + 1, v)
        elif self.self_k is not None:
            k, v = torch.cat([self.self_k, k], dim=2), torch.cat([self.self_v, v], dim=2)
        self.self_k, self.self_v = k, v
        return k, v


@dataclass
class KVCache:
    layers: list[LayerCache] = field(default_factory=list)

    @property
    def length(self) -> int:
        first = self.layers[0].self_k if self.layers else None
        return 0 if first is None else first.shape[2]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of the batch (beam search). Cross keys held per row follow their rows;
        cross keys held once per context row (shared by a group of decoded rows, see `Attention`) stay,
        as beam search reorders rows only within their group."""
        for layer in self.layers:
            rows = layer.self_k.shape[0] if layer.self_k is not None else None
            for name in ("self_k", "self_v", "cross_k", "cross_v"):
                value = getattr(layer, name)
                if value is not None and (name.startswith("self") or value.shape[0] == rows):
                    setattr(layer, name, value.index_select(0, index))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention + output projection + residual + LayerNorm (BERT's post-norm)."""

    def __init__(self, width: int, heads: int, kv_width: int | None = None, dropout: float = 0.0, eps: float = 1e-12) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.dropout, self.cross = heads, dropout, kv_width is not None
        if self.cross:
            self.query = NormalLinear(width, width)
            self.key_value = NormalLinear(kv_width, 2 * width)
        else:
            self.query_key_value = NormalLinear(width, 3 * width)
        self.dense = NormalLinear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        context: torch.Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """`mask` is additive, broadcastable to [B, heads, L_query, L_key] (0 = attend)."""
        if self.cross:
            q = _heads(self.query(x), self.heads)
            if cache is not None and cache.cross_k is not None:
                k, v = cache.cross_k, cache.cross_v
            else:
                k, v = (_heads(t, self.heads) for t in self.key_value(context).chunk(2, dim=-1))
                if cache is not None:
                    cache.cross_k, cache.cross_v = k, v
        else:
            q, k, v = (_heads(t, self.heads) for t in self.query_key_value(x).chunk(3, dim=-1))
            if cache is not None:
                k, v = cache.append(k, v)
        if self.cross and q.shape[0] != k.shape[0]:
            out = _grouped_cross_attention(q, k, v, mask)
        else:
            out = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(x.shape)
        return self.norm(x + F.dropout(self.dense(out), self.dropout, self.training))


# Queries at most this many (a decoding step's, or its beams') attend by plain products on a CPU in
# half precision: torch's CPU flash kernel costs several times its float32 time there for so few rows.
FEW_QUERIES = 8


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention [B, heads, L_query, dim]; `mask` additive."""
    if q.shape[2] <= FEW_QUERIES and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and not dropout:
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores + mask
        return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def _grouped_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Cross-attention of N = C * G query rows to C context rows, consecutive groups of G query rows
    sharing one (a beam search's beams share their image): the group's queries are attended as one
    row of G * L queries, so the context's keys/values are computed, cached and read once per group."""
    rows, heads, length, dim = q.shape
    contexts = k.shape[0]
    if rows % contexts:
        raise ValueError(f"{rows} decoded rows cannot share {contexts} context rows in equal groups")
    group = rows // contexts
    q = q.view(contexts, group, heads, length, dim).transpose(1, 2).reshape(contexts, heads, group * length, dim)
    out = attend(q, k, v, mask)
    return out.view(contexts, heads, group, length, dim).transpose(1, 2).reshape(rows, heads, length, dim)


class Layer(nn.Module):
    def __init__(self, width: int, heads: int, intermediate: int, cross_width: int | None, dropout: float,
                 eps: float, activation: str) -> None:
        super().__init__()
        self.attention = Attention(width, heads, dropout=dropout, eps=eps)
        self.cross_attention = Attention(width, heads, cross_width, dropout, eps) if cross_width else None
        self.intermediate = NormalLinear(width, intermediate)
        self.act = ACTIVATIONS[activation]()
        self.output = NormalLinear(intermediate, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None,
                context_mask: torch.Tensor | None, cache: LayerCache | None) -> torch.Tensor:
        x = self.attention(x, mask, cache=cache)
        cached_context = cache is not None and cache.cross_k is not None
        if self.cross_attention is not None and (context is not None or cached_context):
            x = self.cross_attention(x, context_mask, context=context, cache=cache)
        return self.norm(x + F.dropout(self.output(self.act(self.intermediate(x))), self.dropout, self.training))


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A large negative, not -inf: a query with no visible key (a left pad) gets a uniform, finite row.
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


class BertTextModel(nn.Module):
    """Embeddings (word + learned position [+ token type]) and `layers` post-norm blocks.

    `cross_attention_layers`: indices of layers that attend to `encoder_hidden_states` of width
    `encoder_width` ("all" for every layer, as in BLIP; ALBEF's fusion layers are the upper half).
    Pass `causal=True` to `forward` for decoding; `cache` makes decoding incremental.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        intermediate: int = 3072,
        max_len: int = 512,
        type_vocab_size: int = 0,
        cross_attention_layers: Sequence[int] | str = (),
        encoder_width: int | None = None,
        dropout: float = 0.0,
        eps: float = 1e-12,
        activation: str = "gelu",
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        if cross_attention_layers == "all":
            cross_attention_layers = range(layers)
        cross = set(cross_attention_layers)
        if cross and encoder_width is None:
            raise ValueError("cross_attention_layers need encoder_width (the image feature width)")
        if not cross.issubset(range(layers)):
            raise ValueError(f"cross_attention_layers {sorted(cross)} outside 0..{layers - 1}")
        self.width, self.max_len, self.dropout = width, max_len, dropout
        self.word_embeddings = NormalEmbedding(vocab_size, width, padding_idx=pad_token_id)
        self.position_embeddings = NormalEmbedding(max_len, width)
        self.token_type_embeddings = NormalEmbedding(type_vocab_size, width) if type_vocab_size else None
        self.embed_norm = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(
            Layer(width, heads, intermediate, encoder_width if i in cross else None, dropout, eps, activation)
            for i in range(layers)
        )

    def new_cache(self) -> KVCache:
        return KVCache([LayerCache() for _ in self.layers])

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None, past: int = 0,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
        positions = position_ids
        if positions is None:
            positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(types)
        return F.dropout(self.embed_norm(x), self.dropout, self.training)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        layers: tuple[int, int] | None = None,
        hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, L, width]. With a cache, `attention_mask` covers the cached tokens too.
        `position_ids` [B, L] replace the column positions (left-padded rows, see DecodeRows).

        `layers=(start, end)` runs only those layers, starting from `hidden_states` when given (ALBEF
        runs its text-only layers, then its fusion layers on their output).
        """
        x = hidden_states
        batch, length = (input_ids if x is None else x).shape[:2]
        device = (input_ids if x is None else x).device
        past = cache.length if cache is not None else 0
        # With explicit positions (continuous batching) the caller keeps them under max_len: no host sync here.
        if position_ids is None and past + length > self.max_len:
            raise ValueError(f"{past + length} tokens exceed the model's max_len {self.max_len}")
        if x is None:
            x = self.embed(input_ids, token_type_ids, past, position_ids)

        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.bool, device=device)
        keep = attention_mask.bool()[:, None, None, :]  # [B,1,1,L_key]
        if causal:
            positions = torch.arange(past, past + length, device=device)
            key_pos = torch.arange(past + length, device=device)
            keep = keep & (key_pos[None, :] <= positions[:, None])[None, None]
        mask = additive_mask(keep, x.dtype)
        context_mask = None
        if encoder_hidden_states is not None and encoder_attention_mask is not None:
            context_mask = additive_mask(encoder_attention_mask.bool()[:, None, None, :], x.dtype)
        start, end = layers if layers is not None else (0, len(self.layers))
        for index in range(start, end):
            layer_cache = cache.layers[index] if cache is not None else None
            x = self.layers[index](x, mask, encoder_hidden_states, context_mask, layer_cache)
        return x


class BertLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> vocabulary logits (BERT's prediction head)."""

    def __init__(self, width: int, vocab_size: int, eps: float = 1e-12, activation: str = "gelu",
                 tied_embedding: nn.Embedding | None = None) -> None:
        """With `tied_embedding`, the output projection shares the word embedding matrix (as BERT and
        BLIP do): one Parameter in two modules, which ZeRO-3 gathers for whichever module runs."""
        super().__init__()
        self.dense = NormalLinear(width, width)
        self.act = ACTIVATIONS[activation]()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.decoder = NormalLinear(width, vocab_size)
        if tied_embedding is not None:
            self.decoder.weight = tied_embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))
