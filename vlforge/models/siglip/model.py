"""SigLIP: an image tower and a text tower projected into one space, trained with the pairwise
sigmoid loss (Zhai et al., 2023) instead of CLIP's softmax."""
from __future__ import annotations

import math
from typing import Any, Mapping

from vlforge.models.clip.model import CLIPTowers
from vlforge.models.layers.contrastive import LogitScale, text_groups
from vlforge.models.output import ModelOutput
from vlforge.models.siglip.loss import LogitBias, sigmoid_loss


class SigLIP(CLIPTowers):
    """CLIP's two towers (`vision`: any `build_vision_tower` config, timm's by default; `text`: a
    TextTransformer) under the pairwise sigmoid loss. The logit scale starts at 10 and the bias at
    -10, the paper's initialisation: with mostly negative pairs in a batch, the loss starts near its
    prior instead of paying log 2 for each of them. `match_identical_texts` makes identically worded
    texts (templated data) matching pairs of each other's images rather than negatives."""

    def __init__(
        self,
        vision: Mapping[str, Any],
        text: Mapping[str, Any],
        embed_dim: int = 512,
        init_logit_scale: float = 10.0,
        init_logit_bias: float = -10.0,
        max_logit_scale: float = 100.0,
        match_identical_texts: bool = False,
        tokenizer: str | None = None,
    ) -> None:
        if not math.isfinite(init_logit_bias):
            raise ValueError(f"model.init_logit_bias must be finite, got {init_logit_bias}")
        super().__init__(vision, text, embed_dim, tokenizer)
        self.logit_scale = LogitScale(1.0 / init_logit_scale, max_logit_scale)
        self.logit_bias = LogitBias(init_logit_bias)
        self.match_identical_texts = match_identical_texts

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
        image_emb = self.encode_image(batch["image"])
        text_emb = self.encode_text(ids, mask)
        scale, bias = self.logit_scale(), self.logit_bias()
        groups = text_groups(ids, mask) if self.match_identical_texts else None
        loss = sigmoid_loss(image_emb, text_emb, scale, bias, groups)
        return ModelOutput(loss=loss, losses={"sigmoid": loss.detach()},
                           extras={"logit_scale": scale.detach(), "logit_bias": bias.detach()})
