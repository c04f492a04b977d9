"""Decoding a BERT-style decoder with a static-shape step, which torch.compile captures as one graph.

`generate`'s usual step grows every layer's keys/values by one column a token, so each step has new
shapes. Here the prompt is prefilled as usual, then its keys/values are copied into buffers of the
longest sequence the generation can reach; a step writes its column in place and attends over all of
them with the columns not yet written masked out. Every step then has the same shapes, and the
compiled step (one graph for the whole decoder and head) is reused for every token.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vlforge.models.layers.bert import BertLMHead, BertTextModel, KVCache, LayerCache


@dataclass
class _ColumnCache(LayerCache):
    """A layer's keys/values in fixed buffers: `append` writes the step's column at `column` [1]."""

    column: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.self_k.index_copy_(2, self.column, k)
        self.self_v.index_copy_(2, self.column, v)
        return self.self_k, self.self_v


def _decode_one(decoder: BertTextModel, lm_head: BertLMHead, ids: torch.Tensor, column: torch.Tensor,
                key_mask: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                cross_keys: list[torch.Tensor | None], cross_values: list[torch.Tensor | None],
                context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
    layers = [_ColumnCache(k, v, ck, cv, column=column) for k, v, ck, cv in zip(keys, values, cross_keys, cross_values)]
    positions = column.expand(ids.shape[0], 1)
    # The context is passed for its mask only: its keys/values are in the cache.
    hidden = decoder(ids, key_mask, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                     causal=False, cache=KVCache(list(layers)), position_ids=positions)
    return lm_head(hidden[:, -1])


# A step in bfloat16 (int8 weights included) on the CPU: inductor's own matrix products (its C++ GEMM
# templates, AMX or AVX-512 micro-kernels, int8-weight ones among them) are timed against ATen's for
# each product of the step and the faster kept (max_autotune). They need the weights as constants of
# the graph (freezing), which then holds its own packed copy of the weights it multiplies. Freezing is
# read from inductor's global config by dynamo as it traces (an option of torch.compile does not reach
# it), so it is set around each call. A float32 step is not faster that way and would hold its weights
# twice: it is compiled plainly. docs/benchmarks.md, section 6, has the measurements.
FROZEN_CPU_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}

_compiled_steps: dict[tuple[str, bool], Callable[..., torch.Tensor]] = {}


def _compiled(device_type: str, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    frozen = device_type == "cpu" and dtype != torch.float32
    if (device_type, frozen) in _compiled_steps:
        return _compiled_steps[device_type, frozen]
    if not frozen:
        step = torch.compile(_decode_one, dynamic=False)
    else:
        compiled = torch.compile(_decode_one, dynamic=False, options=FROZEN_CPU_OPTIONS)

        def step(*args: object) -> torch.Tensor:
            with torch._inductor.config.patch(freezing=True):
                return compiled(*args)
    _compiled_steps[device_type, frozen] = step
    return step


class StaticDecoding:
    """The `step` and the `cache` of `vlforge.models.layers.generation.generate` (pass this object as
    both) for `decoder` cross-attending to `context`, with sequences of at most `capacity` tokens
    (the prompt included); `compiled` runs each step through torch.compile."""

    def __init__(self, decoder: BertTextModel, lm_head: BertLMHead, context: torch.Tensor, capacity: int,
                 context_mask: torch.Tensor | None = None, compiled: bool = True) -> None:
        if capacity > decoder.max_len:
            raise ValueError(f"{capacity} tokens exceed the decoder's max_len {decoder.max_len}")
        self.decoder, self.lm_head, self.context, self.context_mask = decoder, lm_head, context, context_mask
        self.capacity, self.compiled = capacity, compiled
        self.weight_dtype = decoder.word_embeddings.weight.dtype  # what the step computes in
        self.prefill = decoder.new_cache()
        self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def reorder(self, index: torch.Tensor) -> None:
        if not self.keys:
            self.prefill.reorder(index)
            return
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]

    def _fill(self) -> None:
        """The prompt's keys/values copied into zeroed buffers of `capacity` columns (masked columns are
        read by the attention: zeros, not uninitialised memory, as 0 x NaN is NaN)."""
        for layer in self.prefill.layers:
            for source, buffers in ((layer.self_k, self.keys), (layer.self_v, self.values)):
                buffer = source.new_zeros(*source.shape[:2], self.capacity, source.shape[3])
                buffer[:, :, : source.shape[2]] = source
                buffers.append(buffer)
        self.length = self.prefill.length

    def __call__(self, new_ids: torch.Tensor, cache: object) -> torch.Tensor:
        if not self.keys:  # the prompt: the usual step, then its keys/values into the buffers
            mask = torch.ones(new_ids.shape, dtype=torch.long, device=new_ids.device)
            hidden = self.decoder(new_ids, mask, encoder_hidden_states=self.context,
                                  encoder_attention_mask=self.context_mask, causal=True, cache=self.prefill)
            self._fill()
            return self.lm_head(hidden[:, -1])
        if new_ids.shape[1] != 1 or self.length >= self.capacity:
            raise ValueError(f"static decoding feeds one token a step within {self.capacity} columns "
                             f"(got {new_ids.shape[1]} at column {self.length})")
        column = torch.tensor([self.length], device=new_ids.device)
        key_mask = (torch.arange(self.capacity, device=new_ids.device) <= self.length).expand(new_ids.shape[0], -1)
        step = _compiled(new_ids.device.type, self.weight_dtype) if self.compiled else _decode_one
        layers = self.prefill.layers
        logits = step(self.decoder, self.lm_head, new_ids, column, key_mask, self.keys, self.values,
                      [layer.cross_k for layer in layers], [layer.cross_v for layer in layers], self.context,
                      self.context_mask)
        self.length += 1
        return logits
