"""BLIP captioning: a ViT image tower and a BERT-style decoder that cross-attends to its tokens."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.models.bert import BertLMHead, BertTextModel, KVCache
from vlforge.models.generation import GenerationConfig, generate
from vlforge.models.output import ModelOutput
from vlforge.models.vision import build_vision_tower


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
        from vlforge.datasets.collate import load_tokenizer

        tok = load_tokenizer(tokenizer)
        bos_token_id = tok.bos_token_id if bos_token_id is None else bos_token_id
        eos_token_id = tok.sep_token_id if eos_token_id is None else eos_token_id
        pad_token_id = tok.pad_token_id
        # [CLS] + the prompt's tokens; the trailing [SEP] is not part of the prompt.
        prompt_length = len(tok(prompt).input_ids) - 1 if prompt_length is None else prompt_length
    if bos_token_id is None or eos_token_id is None:
        raise ValueError("a decoder needs a tokenizer, or bos_token_id and eos_token_id")
    return bos_token_id, eos_token_id, pad_token_id, prompt_length or 1


class BlipCaptioner(nn.Module):
    """Image-grounded language modelling, as BLIP's captioning finetune.

    The decoder reads `[DEC] prompt caption [SEP]`; the prompt's tokens are not scored. `tokenizer`
    (a directory or hub id) supplies the special ids and decodes captions; the ids can also be given
    directly (tests, converted checkpoints).
    """

    def __init__(
        self,
        vision: Mapping[str, Any],
        text: Mapping[str, Any],
        tokenizer: str | None = None,
        prompt: str = "a picture of ",
        label_smoothing: float = 0.1,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        prompt_length: int | None = None,
        tie_word_embeddings: bool = True,
    ) -> None:
        super().__init__()
        self.vision = build_vision_tower(vision)
        text = {"cross_attention_layers": "all", "encoder_width": self.vision.width, **text}
        self.text_decoder = BertTextModel(**text)
        self.lm_head = BertLMHead(self.text_decoder.width, text["vocab_size"],
                                  tied_embedding=self.text_decoder.word_embeddings if tie_word_embeddings else None)
        self.tokenizer_name, self.prompt, self.label_smoothing = tokenizer, prompt, label_smoothing
        self.bos_token_id, self.eos_token_id, self.pad_token_id, self.prompt_length = special_token_ids(
            tokenizer, prompt, bos_token_id, eos_token_id, pad_token_id, prompt_length)

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        _, tokens = self.vision(image)
        return tokens

    def logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_decoder(input_ids, attention_mask, encoder_hidden_states=image_tokens, causal=True)
        return self.lm_head(hidden)

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        input_ids = batch["text_input_ids"].clone()
        input_ids[:, 0] = self.bos_token_id  # the tokenizer's [CLS] becomes the decoder's [DEC]
        mask = batch["text_attention_mask"]
        logits = self.logits(self.image_tokens(batch["image"]), input_ids, mask)
        # The collator's count when it added the prompt (data.prompts), else the model's own.
        prompt_length = batch.get("text_prompt_length", self.prompt_length)
        loss = language_model_loss(logits, input_ids, mask, prompt_length, self.label_smoothing)
        return ModelOutput(loss=loss, losses={"lm": loss.detach()})

    @torch.no_grad()
    def generate_ids(self, image: torch.Tensor, prompt_ids: torch.Tensor, cfg: GenerationConfig | None = None,
                     **cfg_kwargs: Any) -> torch.Tensor:
        """Decoding with a KV cache (image keys/values computed once): greedy, beam search or nucleus
        sampling per `cfg` (or GenerationConfig keyword arguments). `prompt_ids` [B, P] start with
        the bos id; returns [B, <= max_length] ids including the prompt, padded after [SEP]."""
        cfg = cfg or GenerationConfig(**cfg_kwargs)
        if prompt_ids.shape[0] != image.shape[0]:
            raise ValueError(f"generate_ids: {prompt_ids.shape[0]} prompts for {image.shape[0]} images")
        # One row of image tokens per image, whatever the beams: they share its cross-attention keys.
        image_tokens = self.image_tokens(image)
        return generate(decoder_step(self.text_decoder, self.lm_head, image_tokens), self.text_decoder.new_cache(),
                        prompt_ids, cfg, self.eos_token_id, self.pad_token_id)

    def generate(self, samples: Mapping[str, Any], use_nucleus_sampling: bool = False, num_beams: int = 3,
                 max_length: int = 30, min_length: int = 10, top_p: float = 0.9,
                 repetition_penalty: float = 1.0) -> list[str]:
        """Captions for `samples["image"]` (uint8 [B,3,H,W]), without the prompt (LAVIS's arguments)."""
        if self.tokenizer_name is None:
            raise ValueError("generate needs the model's tokenizer; use generate_ids with token ids")
        from vlforge.datasets.collate import load_tokenizer

        tok = load_tokenizer(self.tokenizer_name)
        image = samples["image"]
        prompt = tok([self.prompt] * image.shape[0], return_tensors="pt").input_ids[:, :-1].to(image.device)
        prompt[:, 0] = self.bos_token_id
        cfg = GenerationConfig(max_length=max_length, min_length=min_length, do_sample=use_nucleus_sampling,
                               num_beams=1 if use_nucleus_sampling else num_beams, top_p=top_p,
                               repetition_penalty=repetition_penalty)
        ids = self.generate_ids(image, prompt, cfg)
        return [c.strip() for c in tok.batch_decode(ids[:, prompt.shape[1]:], skip_special_tokens=True)]


def decoder_step(decoder: BertTextModel, lm_head: BertLMHead, context: torch.Tensor,
                 context_mask: torch.Tensor | None = None) -> Callable[[torch.Tensor, KVCache], torch.Tensor]:
    """The `step` of `vlforge.models.generation.generate` for a BERT-style decoder cross-attending to
    `context`: one row per decoded row, or one per group of consecutive rows (per image, its beams),
    which then share its keys/values. Returns the next-token logits of the newest position."""

    def step(new_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        mask = torch.ones(new_ids.shape[0], cache.length + new_ids.shape[1], dtype=torch.long, device=new_ids.device)
        hidden = decoder(new_ids, mask, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                         causal=True, cache=cache)
        return lm_head(hidden[:, -1])

    return step
