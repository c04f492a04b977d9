"""What BLIP's text decoders share: LM labels and loss, the special token ids a prompt is framed with,
and one decoding step over a KV cache."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vlforge.core.tokenizers import load_tokenizer
from vlforge.datasets.instruct import pad_rows
from vlforge.models.layers.bert import BertLMHead, BertTextModel, KVCache, LayerCache
from vlforge.models.layers.decode_rows import DecodeRows, RowStart, left_padded_positions
from vlforge.models.layers.generation import GenerationConfig, generate
from vlforge.models.layers.static_decode import StaticDecoding


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int | torch.Tensor) -> torch.Tensor:
    """Targets with padding and the first `prompt_length` tokens (one count, or one per row as the
    collator's `{key}_prompt_length` gives it) set to -100, the ignored index."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    in_prompt = positions[None, :] < torch.as_tensor(prompt_length, device=input_ids.device).reshape(-1, 1)
    return input_ids.masked_fill((attention_mask == 0) | in_prompt, -100)


def language_model_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        prompt_length: int | torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Next-token cross-entropy over the tokens after the prompt, padding excluded."""
    labels = lm_labels(input_ids, attention_mask, prompt_length)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, label_smoothing=label_smoothing)


def special_token_ids(tokenizer: str | None, prompt: str, bos_token_id: int | None, eos_token_id: int | None,
                      pad_token_id: int, prompt_length: int | None) -> tuple[int, int, int, int]:
    """(bos, eos, pad, prompt length) from the tokenizer, unless given."""
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        bos_token_id = tok.bos_token_id if bos_token_id is None else bos_token_id
        eos_token_id = tok.sep_token_id if eos_token_id is None else eos_token_id
        pad_token_id = tok.pad_token_id
        # [CLS] + the prompt's tokens; the trailing [SEP] is not part of the prompt.
        prompt_length = len(tok(prompt).input_ids) - 1 if prompt_length is None else prompt_length
    if bos_token_id is None or eos_token_id is None:
        raise ValueError("a decoder needs a tokenizer, or bos_token_id and eos_token_id")
    return bos_token_id, eos_token_id, pad_token_id, prompt_length or 1


def decoder_step(decoder: BertTextModel, lm_head: BertLMHead, context: torch.Tensor,
                 context_mask: torch.Tensor | None = None) -> Callable[[torch.Tensor, KVCache], torch.Tensor]:
    """The `step` of `vlforge.models.layers.generation.generate` for a BERT-style decoder cross-attending to
    `context`: one row per decoded row, or one per group of consecutive rows (per image, its beams),
    which then share its keys/values. Returns the next-token logits of the newest position."""

    def step(new_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        mask = torch.ones(new_ids.shape[0], cache.length + new_ids.shape[1], dtype=torch.long, device=new_ids.device)
        hidden = decoder(new_ids, mask, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                         causal=True, cache=cache)
        return lm_head(hidden[:, -1])

    return step


def decode(decoder: BertTextModel, lm_head: BertLMHead, context: torch.Tensor, context_mask: torch.Tensor | None,
           prompt_ids: torch.Tensor, cfg: GenerationConfig, eos_id: int, pad_id: int,
           compiled: bool = False) -> torch.Tensor:
    """`generate` over the decoder cross-attending to `context`; `compiled`: through a static-shape step
    captured by torch.compile (StaticDecoding), where the sequences fit the decoder's positions."""
    if compiled and cfg.max_length <= decoder.max_len:
        decoding = StaticDecoding(decoder, lm_head, context, cfg.max_length, context_mask)
        return generate(decoding, decoding, prompt_ids, cfg, eos_id, pad_id)
    return generate(decoder_step(decoder, lm_head, context, context_mask), decoder.new_cache(), prompt_ids, cfg,
                    eos_id, pad_id)


def start_decoder_rows(decoder: BertTextModel, lm_head: BertLMHead, context: torch.Tensor,
                       prompts: list[list[int]], pad_id: int) -> RowStart:
    """Prefill one prompt (token ids, bos first) per `context` row, left-padded to the longest, for
    continuous batching (DecodeRows): cross-attention keys/values become the rows' fixed part."""
    ids, mask = pad_rows([torch.tensor(p) for p in prompts], pad_id, left=True)
    ids, mask = ids.to(context.device), mask.to(context.device)
    positions = left_padded_positions(mask)
    cache = decoder.new_cache()
    hidden = decoder(ids, mask, encoder_hidden_states=context, causal=True, cache=cache, position_ids=positions)
    rows = DecodeRows([t for layer in cache.layers for t in (layer.self_k, layer.self_v)],
                      [t for layer in cache.layers if layer.cross_k is not None for t in (layer.cross_k, layer.cross_v)],
                      mask, positions[:, -1] + 1)
    return RowStart(rows, lm_head(hidden[:, -1]), [list(p) for p in prompts])


def step_decoder_rows(decoder: BertTextModel, lm_head: BertLMHead, rows: DecodeRows,
                      next_ids: torch.Tensor) -> torch.Tensor:
    """Feed one token per row; returns the next-token logits [N, V] and advances `rows`."""
    fixed, growing = iter(rows.fixed), rows.growing
    layers = []
    for index, layer in enumerate(decoder.layers):
        cross = (next(fixed), next(fixed)) if layer.cross_attention is not None else (None, None)
        layers.append(LayerCache(growing[2 * index], growing[2 * index + 1], *cross, rows=rows, slot=2 * index))
    hidden = decoder(next_ids[:, None], rows.step_mask(), causal=True, cache=KVCache(layers),
                     position_ids=rows.positions[:, None])
    rows.advance()
    return lm_head(hidden[:, -1])
