"""BLIP-2 stage 2: the Q-Former's queries, projected, become a visual prefix to a frozen causal LM.

Any transformers AutoModelForCausalLM serves (OPT, Llama, GPT-2, ...): from a local directory or hub
id (`language_model.pretrained`), or built from a config (`language_model.config`, tiny and random
in tests and the demo). The batch's text must be tokenized with the LM's own tokenizer.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlforge.core.tokenizers import end_token_id, load_tokenizer
from vlforge.datasets.instruct import pad_rows
from vlforge.models.blip.decoder import lm_labels
from vlforge.models.blip2.prefix_lm import QueryPrefixLM
from vlforge.models.language.causal_lm import build_causal_lm, prompt_token_count
from vlforge.models.language.lm_rows import start_lm_rows, step_lm_rows
from vlforge.models.layers.decode_rows import DecodeRows, RowStart, Vocabulary
from vlforge.models.output import ModelOutput


class Blip2CausalLM(QueryPrefixLM):
    """Stage-2 BLIP-2: loss `lm` over the text after the visual prefix (and after the prompt); the LM
    frozen by default (`freeze_language_model`)."""

    def __init__(
        self,
        vision: Mapping[str, Any],
        qformer: Mapping[str, Any],
        language_model: Mapping[str, Any],
        tokenizer: str | None = None,
        prompt: str = "",
        freeze_language_model: bool = True,
        eos_text: str | None = None,
    ) -> None:
        super().__init__(vision, qformer, language_model, build_causal_lm, freeze_language_model)
        self.tokenizer_name, self.prompt = tokenizer, prompt
        # LAVIS's Blip2OPT ends its texts with "\n" (appended in training, the end of generation);
        # None: the tokenizer's eos, as transformers' BLIP-2.
        self.eos_text = eos_text
        self.prompt_length = 0 if tokenizer is None else prompt_token_count(tokenizer, prompt)

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
        if self.eos_text is not None:  # LAVIS's Blip2OPT appends it to every text it trains on
            ids, mask = _ended(ids, mask, self.eos_token_id())
        embeds, full_mask = self._inputs(batch["image"], ids, mask)
        logits = self.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits
        # The last query predicts the first text token, so an LM without a bos token learns it too.
        text_logits = logits[:, embeds.shape[1] - ids.shape[1] - 1 : -1]
        labels = lm_labels(ids, mask, batch.get("text_prompt_length", self.prompt_length)).to(text_logits.device)
        lm = F.cross_entropy(text_logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return ModelOutput(loss=lm, losses={"lm": lm.detach()})

    @torch.no_grad()
    def generate_ids(self, image: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 30, **generate_kwargs: Any) -> torch.Tensor:
        """New token ids [B, <= max_new_tokens] after the visual prefix and `prompt_ids` (which start
        with the tokenizer's bos, if it has one), by the LM's own `generate` (greedy unless told)."""
        if prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        embeds, mask = self._inputs(image, prompt_ids, prompt_mask)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                            max_new_tokens=max_new_tokens, **generate_kwargs)

    def _tokenizer(self) -> Any:
        if self.tokenizer_name is None:
            raise ValueError("generate needs the model's tokenizer; use generate_ids with token ids")
        return load_tokenizer(self.tokenizer_name)

    def eos_token_id(self) -> int:
        """The id that ends a text: the first token of `eos_text`, else the tokenizer's end."""
        tok = self._tokenizer()
        if self.eos_text is None:
            return end_token_id(tok)
        return tok(self.eos_text, add_special_tokens=False).input_ids[0]

    def vocabulary(self) -> Vocabulary:
        return Vocabulary(self._tokenizer(), self.eos_token_id(),
                          getattr(self.language_model.config, "max_position_embeddings", None))

    def prompt_ids(self, prompt: str | None = None) -> list[int]:
        """The tokenizer's leading special tokens and `prompt` (the model's, as `generate` cuts it)."""
        tok = self._tokenizer()
        if prompt is None:
            return tok(self.prompt).input_ids[: self.prompt_length]
        return tok(prompt).input_ids[: prompt_token_count(self.tokenizer_name, prompt)]

    def chat_prompt(self, text: str | None) -> str | None:
        return text  # BLIP-2 continues its prompt: the chat's text replaces the model's, as LAVIS's prompt does

    @torch.no_grad()
    def start_rows(self, image: torch.Tensor, prompts: list[str | None]) -> RowStart:
        """Continuous-batching start: texts for `image` (uint8 [B,3,H,W]) after the visual prefix and
        each prompt (None: the model's), rows left-padded as transformers' generate pads them."""
        prefix = self.visual_prefix(image)
        embed = self.language_model.get_input_embeddings()
        device = embed.weight.device
        texts = [embed(torch.tensor(self.prompt_ids(p), dtype=torch.long, device=device)) for p in prompts]
        embeds, mask = pad_rows([torch.cat([prefix[i].to(device=t.device, dtype=t.dtype), t]) for i, t in enumerate(texts)],
                                0.0, left=True)
        return start_lm_rows(self.language_model, embeds, mask)

    @torch.no_grad()
    def step_rows(self, rows: DecodeRows, next_ids: torch.Tensor) -> torch.Tensor:
        return step_lm_rows(self.language_model, rows, next_ids)

    def generate(self, samples: Mapping[str, Any], use_nucleus_sampling: bool = False, num_beams: int = 5,
                 max_length: int = 30, min_length: int = 1, top_p: float = 0.9,
                 repetition_penalty: float = 1.0) -> list[str]:
        """Texts for `samples["image"]` (uint8 [B,3,H,W]), continuing the model's prompt; LAVIS's
        arguments: `max_length` counts new tokens, `min_length` the prompt's (with its bos) and the new
        ones. With several ranks every rank keeps stepping until all are done (transformers'
        synced_gpus), so ZeRO-3's per-step parameter gathers line up."""
        tok = self._tokenizer()
        image = samples["image"]
        prompt = tok([self.prompt] * image.shape[0], return_tensors="pt").input_ids[:, : self.prompt_length]
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ids = self.generate_ids(image, prompt.to(image.device), max_new_tokens=max_length,
                                min_new_tokens=max(0, min_length - prompt.shape[1]),
                                num_beams=num_beams, do_sample=use_nucleus_sampling,
                                top_p=top_p if use_nucleus_sampling else None, repetition_penalty=repetition_penalty,
                                eos_token_id=self.eos_token_id(), pad_token_id=tok.pad_token_id, synced_gpus=synced)
        return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]


def _ended(ids: torch.Tensor, mask: torch.Tensor, end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows with `end_id` after each row's last token (one column more)."""
    lengths = mask.sum(dim=1)
    ids = torch.cat([ids, ids.new_zeros(ids.shape[0], 1)], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 1)], dim=1)
    rows = torch.arange(ids.shape[0], device=ids.device)
    ids[rows, lengths], mask[rows, lengths] = end_id, 1
    return ids, mask
