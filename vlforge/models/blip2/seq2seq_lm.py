"""BLIP-2 stage 2 with an encoder-decoder LM (FlanT5, as LAVIS's blip2_t5): the Q-Former's queries,
projected, open the LM encoder's input, followed by the prompt's tokens; the decoder writes the text.

Any transformers AutoModelForSeq2SeqLM serves, from a local directory or hub id
(`language_model.pretrained`) or built from a config (`language_model.config`). The batch's text must
be tokenized with the LM's own tokenizer, without a prompt in front (`data.prompts.text: ''`): the
prompt goes to the encoder (`model.prompt`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlforge.core.tokenizers import load_tokenizer
from vlforge.models.blip2.prefix_lm import QueryPrefixLM
from vlforge.models.language.causal_lm import build_seq2seq_lm
from vlforge.models.output import ModelOutput

IGNORE = -100


class Blip2Seq2SeqLM(QueryPrefixLM):
    """Loss `lm`: the decoder's cross-entropy over the text (its end token included) given the visual
    prefix and the prompt in the encoder. The LM is frozen by default."""

    def __init__(
        self,
        vision: Mapping[str, Any],
        qformer: Mapping[str, Any],
        language_model: Mapping[str, Any],
        tokenizer: str | None = None,
        prompt: str = "",
        freeze_language_model: bool = True,
    ) -> None:
        super().__init__(vision, qformer, language_model, build_seq2seq_lm, freeze_language_model)
        self.tokenizer_name, self.prompt = tokenizer, prompt

    def _tokenizer(self) -> Any:
        if self.tokenizer_name is None:
            raise ValueError("this BLIP-2 model needs its tokenizer (model.tokenizer) to encode prompts")
        return load_tokenizer(self.tokenizer_name)

    def encode_prompts(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and mask of the prompts as the LM's tokenizer frames them (T5: the text and </s>),
        right-padded to the longest, as LAVIS's Blip2T5 tokenizes them."""
        tokens = self._tokenizer()(prompts, padding="longest", return_tensors="pt")
        return tokens.input_ids.to(device), tokens.attention_mask.to(device)

    def _prompts(self, batch: Mapping[str, Any], rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's `prompt_input_ids` / `prompt_attention_mask`, else its `prompt` (a string or one
        per row), else the model's prompt for every row."""
        if "prompt_input_ids" in batch:
            return batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device)
        prompt = batch.get("prompt", self.prompt)
        prompts = [prompt] * rows if isinstance(prompt, str) else list(prompt)
        if len(prompts) != rows:
            raise ValueError(f"prompt: {len(prompts)} prompts for {rows} images")
        return self.encode_prompts(prompts, device)

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        image, ids, mask = batch["image"], batch["text_input_ids"], batch["text_attention_mask"]
        prompt_length = batch.get("text_prompt_length")
        if prompt_length is not None and bool((torch.as_tensor(prompt_length) > 0).any()):
            raise ValueError("text_prompt_length > 0: an encoder-decoder LM reads its prompt in the encoder "
                             "(model.prompt); the text it writes must come without one (data.prompts.text: '')")
        embeds, encoder_mask = self._inputs(image, *self._prompts(batch, image.shape[0], image.device))
        labels = ids.masked_fill(mask == 0, IGNORE).to(embeds.device)
        # The decoder's inputs are the labels shifted right behind its start token, as transformers'
        # T5 builds them from `labels`; padding stays masked.
        logits = self.language_model(inputs_embeds=embeds, attention_mask=encoder_mask, labels=labels,
                                      decoder_attention_mask=mask.to(embeds.device)).logits
        lm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        return ModelOutput(loss=lm, losses={"lm": lm.detach()})

    @torch.no_grad()
    def generate_ids(self, image: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     **generate_kwargs: Any) -> torch.Tensor:
        """The decoder's ids [B, <= 1 + max_new_tokens] (its start token first) for `image` and the
        encoder's prompt ids, by the LM's own `generate` (greedy unless told)."""
        embeds, mask = self._inputs(image, prompt_ids, prompt_mask)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)

    def generate(self, samples: Mapping[str, Any], use_nucleus_sampling: bool = False, num_beams: int = 5,
                 max_length: int = 30, min_length: int = 1, top_p: float = 0.9, temperature: float = 1.0,
                 repetition_penalty: float = 1.0, length_penalty: float = 1.0) -> list[str]:
        """Texts for `samples["image"]` (uint8 [B,3,H,W]) after the model's prompt (or `samples["prompt"]`:
        one string, or one per image); LAVIS's arguments: `max_length` counts new tokens, `min_length`
        the decoder's tokens with its start token. Under several ranks every rank steps until all are
        done (synced_gpus), so ZeRO-3's gathers line up."""
        image = samples["image"]
        prompt_ids, prompt_mask = self._prompts(samples, image.shape[0], image.device)
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        sampling = {"do_sample": True, "top_p": top_p, "temperature": temperature} if use_nucleus_sampling \
            else {"do_sample": False}
        ids = self.generate_ids(image, prompt_ids, prompt_mask, num_beams=num_beams, max_new_tokens=max_length,
                                min_length=min_length, repetition_penalty=repetition_penalty,
                                length_penalty=length_penalty, synced_gpus=synced, **sampling)
        return [t.strip() for t in self._tokenizer().batch_decode(ids, skip_special_tokens=True)]
