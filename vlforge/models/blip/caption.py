"""BLIP captioning: a ViT image tower and a BERT-style decoder that cross-attends to its tokens."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from vlforge.core.tokenizers import load_tokenizer
from vlforge.models.blip.decoder import (
    decode,
    language_model_loss,
    special_token_ids,
    start_decoder_rows,
    step_decoder_rows,
)
from vlforge.models.layers.bert import BertLMHead, BertTextModel
from vlforge.models.layers.decode_rows import DecodeRows, RowStart, Vocabulary
from vlforge.models.layers.generation import GenerationConfig
from vlforge.models.output import ModelOutput
from vlforge.models.towers.build import build_vision_tower


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
        self.compile_decoding = False  # generate through a compiled static-shape step (load_model(compile=True))
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
        return decode(self.text_decoder, self.lm_head, image_tokens, None, prompt_ids, cfg, self.eos_token_id,
                      self.pad_token_id, self.compile_decoding)

    def _tokenizer(self) -> Any:
        if self.tokenizer_name is None:
            raise ValueError("generate needs the model's tokenizer; use generate_ids with token ids")
        return load_tokenizer(self.tokenizer_name)

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self._tokenizer(), self.eos_token_id, self.text_decoder.max_len, len(self.prompt_ids()))

    def prompt_ids(self, prompt: str | None = None) -> list[int]:
        """`[DEC] prompt` ids: the decoder's start for a caption beginning with `prompt` (the model's)."""
        ids = self._tokenizer()(self.prompt if prompt is None else prompt).input_ids[:-1]  # no [SEP]
        return [self.bos_token_id, *ids[1:]]

    def chat_prompt(self, text: str | None) -> str | None:
        return None  # a captioner captions: the chat's words are not a caption prefix (/v1/caption's prompt is)

    @torch.no_grad()
    def start_rows(self, image: torch.Tensor, prompts: list[str | None]) -> RowStart:
        """Continuous-batching start: captions of `image` (uint8 [B,3,H,W]), each continuing its prompt
        (None: the model's), as `generate` would begin them."""
        return start_decoder_rows(self.text_decoder, self.lm_head, self.image_tokens(image),
                                  [self.prompt_ids(p) for p in prompts], self.pad_token_id)

    @torch.no_grad()
    def step_rows(self, rows: DecodeRows, next_ids: torch.Tensor) -> torch.Tensor:
        return step_decoder_rows(self.text_decoder, self.lm_head, rows, next_ids)

    def generate(self, samples: Mapping[str, Any], use_nucleus_sampling: bool = False, num_beams: int = 3,
                 max_length: int = 30, min_length: int = 10, top_p: float = 0.9,
                 repetition_penalty: float = 1.0) -> list[str]:
        """Captions for `samples["image"]` (uint8 [B,3,H,W]), without the prompt (LAVIS's arguments)."""
        tok = self._tokenizer()
        image = samples["image"]
        prompt = tok([self.prompt] * image.shape[0], return_tensors="pt").input_ids[:, :-1].to(image.device)
        prompt[:, 0] = self.bos_token_id
        cfg = GenerationConfig(max_length=max_length, min_length=min_length, do_sample=use_nucleus_sampling,
                               num_beams=1 if use_nucleus_sampling else num_beams, top_p=top_p,
                               repetition_penalty=repetition_penalty)
        ids = self.generate_ids(image, prompt, cfg)
        return [c.strip() for c in tok.batch_decode(ids[:, prompt.shape[1]:], skip_special_tokens=True)]
