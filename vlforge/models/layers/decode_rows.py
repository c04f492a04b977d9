"""Sequences decoded together, each at its own length, in one batch that rows leave and join between
steps: the KV cache a server's continuous batching needs.

A model's `start_rows` encodes new requests (images batched, prompts prefilled) into a `DecodeRows`;
the scheduler concatenates it onto the running batch, `select`s the rows that go on after each step,
and the model's `step_rows` feeds one token per row. Self-attention keys/values are left-padded to one
length, with `key_mask` marking each row's real columns, so a row attends to exactly what it would
alone; `positions` are each row's own (its count of real tokens), not the padded column.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


class DecodeRows:
    """`growing`: per-layer tensors [N, heads, L, dim] that gain one column per step (self-attention
    keys and values, in the model's order), held in buffers with spare columns so that a step writes
    its column in place instead of copying the cache; `fixed`: per-row tensors [N, ...] that do not
    grow (cross-attention keys and values); `key_mask` [N, L] (1 = a real column); `positions` [N],
    the position id of each row's next token.

    A model's step writes each layer's new keys/values with `append_column`, then calls `advance`."""

    def __init__(self, growing: Sequence[torch.Tensor], fixed: Sequence[torch.Tensor], key_mask: torch.Tensor,
                 positions: torch.Tensor) -> None:
        self.length = key_mask.shape[1]
        self._buffers = []
        for tensor in growing:
            buffer = self._new_buffer(tensor, tensor.shape[0], self.length)
            buffer[:, :, : self.length] = tensor
            self._buffers.append(buffer)
        self.fixed, self.key_mask, self.positions = list(fixed), key_mask, positions

    @staticmethod
    def _new_buffer(like: torch.Tensor, rows: int, length: int) -> torch.Tensor:
        """An uninitialised buffer for `rows` rows of `length` columns, with spare columns to grow into."""
        return like.new_empty(rows, like.shape[1], length + max(16, length // 2), like.shape[3])

    @classmethod
    def _of_buffers(cls, buffers: list[torch.Tensor], length: int, fixed: list[torch.Tensor], key_mask: torch.Tensor,
                    positions: torch.Tensor) -> "DecodeRows":
        rows = cls.__new__(cls)
        rows._buffers, rows.length = buffers, length
        rows.fixed, rows.key_mask, rows.positions = fixed, key_mask, positions
        return rows

    @property
    def size(self) -> int:
        return self.key_mask.shape[0]

    @property
    def growing(self) -> list[torch.Tensor]:
        return [buffer[:, :, : self.length] for buffer in self._buffers]

    def step_mask(self) -> torch.Tensor:
        """The attention mask of a step: the cached columns and the new token's."""
        return F.pad(self.key_mask, (0, 1), value=1)

    def append_column(self, index: int, new: torch.Tensor) -> torch.Tensor:
        """Write a step's keys or values [N, heads, 1, dim] of growing tensor `index` after the cached
        columns; returns all of them [N, heads, L + 1, dim] (a view of the buffer)."""
        buffer = self._buffers[index]
        if buffer.shape[2] < self.length + new.shape[2]:  # full: double the buffer, once in a while
            grown = buffer.new_empty(*buffer.shape[:2], 2 * buffer.shape[2] + new.shape[2], buffer.shape[3])
            grown[:, :, : self.length] = buffer[:, :, : self.length]
            self._buffers[index] = buffer = grown
        end = self.length + new.shape[2]
        buffer[:, :, self.length:end] = new
        return buffer[:, :, :end]

    def advance(self) -> None:
        """After a step: one more real column, positions moved on."""
        self.length += 1
        self.key_mask = self.step_mask()
        self.positions = self.positions + 1

    def select(self, index: torch.Tensor) -> "DecodeRows":
        """Rows `index`, in that order, with the columns no kept row uses cut from the left."""
        index = index.to(self.key_mask.device)
        mask = self.key_mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        # One copy: the kept rows of each whole buffer (its spare columns too), from the first used column.
        # An LM spread over devices (device_map) keeps each layer's keys/values on that layer's device.
        buffers = [b.index_select(0, index.to(b.device))[:, :, start:] for b in self._buffers]
        return DecodeRows._of_buffers(buffers, self.length - start,
                                      [t.index_select(0, index.to(t.device)) for t in self.fixed], mask[:, start:],
                                      self.positions[index.to(self.positions.device)])

    @staticmethod
    def concat(parts: Sequence["DecodeRows"]) -> "DecodeRows":
        """One batch of `parts`' rows, in order, each left-padded to the longest."""
        parts = [p for p in parts if p.size]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            raise ValueError("DecodeRows.concat needs at least one non-empty part")
        length, total = max(p.length for p in parts), sum(p.size for p in parts)
        buffers = []
        for i, first in enumerate(parts[0]._buffers):  # each part's rows written once, right-aligned
            buffer = DecodeRows._new_buffer(first, total, length)
            row = 0
            for part in parts:
                pad = length - part.length
                # Masked, yet read by the attention: zeros, not uninitialised memory (0 x NaN is NaN).
                buffer[row:row + part.size, :, :pad].zero_()
                buffer[row:row + part.size, :, pad:length] = part._buffers[i][:, :, : part.length]
                row += part.size
            buffers.append(buffer)
        fixed = [torch.cat([p.fixed[i] for p in parts]) for i in range(len(parts[0].fixed))]
        mask = torch.cat([F.pad(p.key_mask, (length - p.length, 0)) for p in parts])
        return DecodeRows._of_buffers(buffers, length, fixed, mask, torch.cat([p.positions for p in parts]))


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows (transformers' generate: the count of real tokens before
    each, padding at 1)."""
    return (mask.long().cumsum(dim=-1) - 1).masked_fill(mask == 0, 1)


@dataclass
class RowStart:
    """What `start_rows` gives the scheduler: the new rows, each row's next-token logits [N, V] after
    its prompt, and each row's token history as the model's `generate` shows it to the repetition
    penalty and n-gram ban (the prompt's ids, or none where the prompt is only embeddings)."""

    rows: DecodeRows
    logits: torch.Tensor
    histories: list[list[int]]


@dataclass(frozen=True)
class Vocabulary:
    """How a stepwise generator's ids become text (its tokenizer, the id that ends a sequence) and its
    lengths: `max_positions`, the longest sequence its decoder takes (prompt included); and
    `generate_length_offset`, the tokens its `generate`'s max_length / min_length count beyond the new
    ones (BLIP's prompt, as in LAVIS; 0 where lengths count new tokens only)."""

    tokenizer: object
    eos_id: int
    max_positions: int | None = None
    generate_length_offset: int = 0
