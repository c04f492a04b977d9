"""Continuous-batching steps (DecodeRows) for a transformers causal LM that reads a prefix of
embeddings: the prefill from `inputs_embeds`, then one token id per row per step, with the position
ids and attention mask transformers' own `generate` would give each row."""
from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from vlforge.models.layers.decode_rows import DecodeRows, RowStart, left_padded_positions


def _cache_tensors(output: object) -> list[torch.Tensor]:
    cache = getattr(output, "cache", None) or output.past_key_values
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


class _RowsLayer(DynamicLayer):
    """A transformers cache layer whose `update` writes into the rows' buffers in place (see
    DecodeRows.append_column) instead of concatenating a new cache every step."""

    def __init__(self, rows: DecodeRows, slot: int) -> None:
        super().__init__()
        self.rows, self.slot = rows, slot
        self.keys, self.values = rows.growing[slot], rows.growing[slot + 1]
        self.device, self.dtype, self.is_initialized = self.keys.device, self.keys.dtype, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys = self.rows.append_column(self.slot, key_states)
        self.values = self.rows.append_column(self.slot + 1, value_states)
        return self.keys, self.values


def _cache_argument(lm: PreTrainedModel, cache: DynamicCache) -> dict[str, DynamicCache]:
    # transformers renamed `past_key_values` to `cache`; older releases know only the first.
    accepted = inspect.signature(lm.forward).parameters
    return {"cache": cache} if "cache" in accepted else {"past_key_values": cache}


def start_lm_rows(lm: PreTrainedModel, embeds: torch.Tensor, mask: torch.Tensor) -> RowStart:
    """Prefill left-padded `embeds` [N, L, width] (`mask` [N, L]); histories are empty, as
    transformers' generate from `inputs_embeds` starts with no input ids."""
    positions = left_padded_positions(mask)
    # Only the last position's logits are needed: not [N, L, vocabulary] of them.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    rows = DecodeRows(_cache_tensors(out), [], mask, positions[:, -1] + 1)
    return RowStart(rows, out.logits[:, -1], [[] for _ in range(mask.shape[0])])


def step_lm_rows(lm: PreTrainedModel, rows: DecodeRows, next_ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per row; returns the next-token logits [N, V] and advances `rows`."""
    cache = DynamicCache()
    cache.layers = [_RowsLayer(rows, slot) for slot in range(0, len(rows.growing), 2)]
    device = lm.get_input_embeddings().weight.device
    out = lm(input_ids=next_ids[:, None].to(device), attention_mask=rows.step_mask().to(device),
             position_ids=rows.positions[:, None].to(device), use_cache=True, **_cache_argument(lm, cache))
    rows.advance()
    return out.logits[:, -1]
