"""LLaVA-style model: an image tower's tokens, through a projector, spliced into a causal LM's input in
place of the `<image>` token (vlforge.datasets.conversation.IMAGE_TOKEN_ID).

- `vision`: any `build_vision_tower` config; LLaVA's is a CLIP ViT (`HFCLIPVisionTower` with
  `feature_layer: -2`, `feature_select: patch`), frozen.
- `projector`: `linear` (LLaVA 1) or `mlp2x_gelu` (LLaVA 1.5: Linear, GELU, Linear).
- `language_model`: any transformers causal LM (`pretrained` directory / hub id, or `config`), as in
  BLIP-2 stage 2; `device_map: auto` spreads a pretrained one over the visible GPUs (inference). `load_4bit` / `load_8bit` quantize its linear layers with bitsandbytes (nf4 with double
  quantization; `compute_dtype` for the matmuls); its embeddings and head stay unquantized.
- What trains: `freeze_language_model` (LLaVA's pretraining stage trains the projector alone) or
  `lora` (peft LoRA adapters on the LM's `target_modules`; the LM's own weights frozen).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlforge.core.tokenizers import end_token_id, load_tokenizer, pad_token_id
from vlforge.datasets.conversation import (
    IGNORE,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_ID,
    ConversationTemplate,
    encode_conversation,
)
from vlforge.datasets.instruct import pad_rows
from vlforge.models.language.causal_lm import build_causal_lm
from vlforge.models.language.lm_rows import start_lm_rows, step_lm_rows
from vlforge.models.language.quantize import quantization_config
from vlforge.models.layers.decode_rows import DecodeRows, RowStart, Vocabulary
from vlforge.models.layers.zero_init import outside_zero_init
from vlforge.models.output import ModelOutput
from vlforge.models.towers.build import build_vision_tower

PROJECTORS = ("linear", "mlp2x_gelu")


def build_projector(kind: str, vision_width: int, lm_width: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(vision_width, lm_width)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_width, lm_width), nn.GELU(), nn.Linear(lm_width, lm_width))
    raise ValueError(f"model.projector={kind!r}: expected one of {', '.join(PROJECTORS)}")


class Llava(nn.Module):
    """Loss `lm`: next-token cross-entropy over the scored positions (`labels` not IGNORE: the answers)."""

    def __init__(
        self,
        vision: Mapping[str, Any],
        language_model: Mapping[str, Any],
        projector: str = "mlp2x_gelu",
        tokenizer: str | None = None,
        template: Mapping[str, Any] | None = None,
        freeze_language_model: bool = False,
        lora: Mapping[str, Any] | None = None,
        load_4bit: bool = False,
        load_8bit: bool = False,
        compute_dtype: str = "float16",
        max_prompt_len: int = 256,
    ) -> None:
        super().__init__()
        self.vision = build_vision_tower(vision)
        lm_args = dict(language_model)
        if load_4bit or load_8bit:
            if "pretrained" not in lm_args:
                raise ValueError("model.load_4bit / load_8bit quantize a pretrained LM: set model.language_model.pretrained")
            lm_args["quantization_config"] = quantization_config(load_4bit, load_8bit, compute_dtype)
        # Built whole outside zero.Init: transformers writes weights after constructing each module.
        with outside_zero_init():
            self.language_model = build_causal_lm(**lm_args)
        self.projector = build_projector(projector, self.vision.width, self.language_model.config.hidden_size)
        self.freeze_language_model = freeze_language_model or load_4bit or load_8bit
        if self.freeze_language_model:
            self.language_model.requires_grad_(False)
        self.lora = lora is not None
        if lora is not None:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as err:
                raise ImportError(f"model.lora needs peft: pip install 'vlforge[lora]' ({err})") from None

            self.language_model = get_peft_model(self.language_model, LoraConfig(task_type="CAUSAL_LM", **dict(lora)))
        self.tokenizer_name = tokenizer
        self.template = ConversationTemplate(**dict(template or {}))
        self.max_prompt_len = max_prompt_len

    def train(self, mode: bool = True) -> "Llava":
        super().train(mode)
        if self.freeze_language_model and not self.lora:
            self.language_model.eval()  # a frozen LM keeps its dropout off; LoRA adapters keep theirs
        return self

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """[B, N, LM width]: what replaces each sample's `<image>` token. `forward` and `generate` take
        them precomputed as the batch's `image_features` (evaluation scores and answers one batch)."""
        return self.projector(self.vision(image)[1])

    def _splice(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None, left_pad: bool,
                features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(inputs_embeds, attention mask, labels) with each row's image token replaced by its N image
        features (labels IGNORE there), rows re-padded to the longest (left for generation).

        Batched: each kept input position gets its output position from a cumulative sum (the image
        token counting N), and text, features and labels are scattered there at once; positions with
        nothing to write go to a spare tail that is cut off. Two host syncs a batch (the one-image
        check and the output length), whatever the batch size."""
        is_image = input_ids == IMAGE_TOKEN_ID
        counts = is_image.sum(dim=1)
        if bool((counts > 1).any()):
            raise ValueError(f"a sequence holds {int(counts.max())} image tokens; LLaVA takes one image per sample")
        if features is None:
            features = self.image_features(image)
        embed = self.language_model.get_input_embeddings()
        device = embed.weight.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        text = embed(input_ids.masked_fill(is_image.to(device), 0))
        is_image = is_image.to(device) & attention_mask.bool()  # an image token under the mask is padding
        # With language_model.device_map the LM's first layers may sit on another device than the tower.
        features = features.to(device=device, dtype=text.dtype)
        batch, num_features = input_ids.shape[0], features.shape[1]
        keep = attention_mask.bool()
        width = torch.where(is_image, num_features, 1) * keep  # output positions each input position takes
        end = width.cumsum(dim=1)
        start = end - width
        total = end[:, -1]
        longest = int(total.max())
        offset = (longest - total)[:, None] if left_pad else torch.zeros_like(total)[:, None]
        spare = longest + num_features  # writes with nowhere to go land in [longest, longest + N)
        text_at = torch.where(keep & ~is_image, start + offset, longest)
        has_image = is_image.any(dim=1)
        image_start = (start * is_image).sum(dim=1, keepdim=True) + offset
        feature_at = torch.where(has_image[:, None], image_start, longest) + torch.arange(num_features, device=device)

        embeds = text.new_zeros(batch, spare, text.shape[-1])
        embeds.scatter_(1, text_at[..., None].expand_as(text), text)
        embeds.scatter_(1, feature_at[..., None].expand_as(features), features)
        mask = torch.zeros(batch, spare, dtype=attention_mask.dtype, device=device)
        mask.scatter_(1, text_at, 1)
        mask.scatter_(1, feature_at, 1)
        out_labels = None
        if labels is not None:
            out_labels = torch.full((batch, spare), IGNORE, dtype=labels.dtype, device=device)
            out_labels.scatter_(1, text_at, labels.to(device))
            out_labels[:, longest:] = IGNORE
        cut = slice(0, longest)
        return embeds[:, cut], mask[:, cut], out_labels[:, cut] if out_labels is not None else None

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        embeds, mask, labels = self._splice(batch["image"], batch["input_ids"], batch["attention_mask"],
                                            batch["labels"], left_pad=False, features=batch.get("image_features"))
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
        return ModelOutput(loss=loss, losses={"lm": loss.detach()})

    def _prompts(self, samples: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if "prompt_input_ids" in samples:
            return samples["prompt_input_ids"], samples["prompt_attention_mask"]

        texts = samples["text_input"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        if len(texts) != samples["image"].shape[0]:
            raise ValueError(f"generate: {len(texts)} prompts for {samples['image'].shape[0]} images")
        return self._encode_prompts(texts, samples["image"].device)

    def _encode_prompts(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask of one human turn per text, framed by the template (`<image>`
        first unless the text places it)."""
        tok = load_tokenizer(self._tokenizer())
        rows = []
        for text in texts:
            turn = text if IMAGE_PLACEHOLDER in text else f"{IMAGE_PLACEHOLDER}\n{text}"
            ids, _ = encode_conversation(tok, self.template, [{"from": "human", "value": turn}], 2**31,
                                         prompt_only=True)
            if len(ids) > self.max_prompt_len:  # cut, it would lose the answer's header: refuse instead
                raise ValueError(f"the prompt is {len(ids)} tokens with its template, over model.max_prompt_len="
                                 f"{self.max_prompt_len}")
            rows.append(torch.tensor(ids))
        ids, mask = pad_rows(rows, pad_token_id(tok), left=True)
        return ids.to(device), mask.to(device)

    def vocabulary(self) -> Vocabulary:
        tok = load_tokenizer(self._tokenizer())
        return Vocabulary(tok, end_token_id(tok), getattr(self.language_model.config, "max_position_embeddings", None))

    def chat_prompt(self, text: str | None) -> str | None:
        return text

    @torch.no_grad()
    def start_rows(self, image: torch.Tensor, prompts: list[str | None]) -> RowStart:
        """Continuous-batching start: answers about `image` (uint8 [B,3,H,W]) to one prompt each (None:
        an empty question), framed and left-padded as `generate` frames them."""
        ids, mask = self._encode_prompts(["" if p is None else p for p in prompts], image.device)
        embeds, mask, _ = self._splice(image, ids, mask, None, left_pad=True)
        return start_lm_rows(self.language_model, embeds, mask)

    @torch.no_grad()
    def step_rows(self, rows: DecodeRows, next_ids: torch.Tensor) -> torch.Tensor:
        return step_lm_rows(self.language_model, rows, next_ids)

    def _tokenizer(self) -> str:
        if self.tokenizer_name is None:
            raise ValueError("generate needs the model's tokenizer (model.tokenizer)")
        return self.tokenizer_name

    @torch.no_grad()
    def generate(self, samples: Mapping[str, Any], use_nucleus_sampling: bool = False, num_beams: int = 1,
                 max_length: int = 30, min_length: int = 1, top_p: float = 0.9, temperature: float = 1.0,
                 repetition_penalty: float = 1.0) -> list[str]:
        """Answers for `samples["image"]` (uint8 [B,3,H,W]) to `samples["text_input"]` (one prompt per
        image; `<image>` marks where the image goes, else it comes first) or to the collator's
        `prompt_input_ids`; lengths count new tokens. Ranks step together (synced_gpus) under ZeRO-3."""
        tok = load_tokenizer(self._tokenizer())
        ids, mask = self._prompts(samples)
        embeds, mask, _ = self._splice(samples["image"], ids, mask, None, left_pad=True,
                                       features=samples.get("image_features"))
        eos = end_token_id(tok)
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        sampling = {"do_sample": True, "top_p": top_p, "temperature": temperature} if use_nucleus_sampling else {"do_sample": False}
        new = self.language_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_length,
                                           min_new_tokens=min_length, num_beams=num_beams,
                                           repetition_penalty=repetition_penalty, eos_token_id=eos,
                                           pad_token_id=tok.pad_token_id, synced_gpus=synced, **sampling)
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
