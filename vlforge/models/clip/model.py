"""CLIP: an image tower and a text tower projected into one space, trained contrastively."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.models.layers.contrastive import (
    DualEncoderFeatures,
    LogitScale,
    contrastive_loss,
)
from vlforge.models.layers.transformer import TextTransformer
from vlforge.models.output import ModelOutput
from vlforge.models.towers.build import build_vision_tower


class CLIPTowers(DualEncoderFeatures, nn.Module):
    """An image tower and a text tower projected into one space of `embed_dim`: `vision` and `text` are
    the arguments of `build_vision_tower` and TextTransformer. CLIP and SigLIP add their loss to it.

    Every parameter lives in a submodule that is called, so ZeRO-3 gathers it (and its gradient is
    reduced) through the submodule's hooks, whichever method uses it.
    """

    def __init__(self, vision: Mapping[str, Any], text: Mapping[str, Any], embed_dim: int = 512,
                 tokenizer: str | None = None) -> None:
        super().__init__()
        self.tokenizer_name = tokenizer  # for extract_features on strings; training uses the collator's ids
        self.vision = build_vision_tower(vision)
        self.text = TextTransformer(**text)
        self.vision_proj = nn.Linear(self.vision.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, embed_dim, bias=False)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.vision(image)
        return F.normalize(self.vision_proj(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.text(input_ids, attention_mask)
        return F.normalize(self.text_proj(pooled), dim=-1)


class CLIP(CLIPTowers):
    """CLIPTowers trained with the symmetric InfoNCE loss, exact across ranks."""

    def __init__(
        self,
        vision: Mapping[str, Any],
        text: Mapping[str, Any],
        embed_dim: int = 512,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__(vision, text, embed_dim, tokenizer)
        self.logit_scale = LogitScale(init_temperature, max_logit_scale)

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        image_emb = self.encode_image(batch["image"])
        text_emb = self.encode_text(batch["text_input_ids"], batch["text_attention_mask"])
        scale = self.logit_scale()
        loss = contrastive_loss(image_emb, text_emb, scale)
        return ModelOutput(loss=loss, losses={"itc": loss.detach()}, extras={"logit_scale": scale.detach()})
