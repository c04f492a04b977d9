"""ALBEF's image-text classification (LAVIS's albef_classification, SNLI-VE: does the image entail,
contradict or leave neutral a text): the fused [CLS] state through a two-layer MLP head."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.core.tokenizers import tokenize_texts
from vlforge.models.albef.model import fused_text_encoder
from vlforge.models.output import ModelOutput
from vlforge.models.towers.build import build_vision_tower


class AlbefClassification(nn.Module):
    """Logits [B, num_classes] for each image and text: the text encoder reads the text in its first
    `fusion_layer` layers and cross-attends to the image tokens in the rest; `cls_head` (Linear,
    ReLU, Linear) reads the [CLS] output. The loss is the cross-entropy against the batch's `label`.

    LAVIS finetunes it with momentum distillation (a momentum copy's predictions as soft targets);
    vlforge trains with the plain cross-entropy, so a LAVIS checkpoint's momentum copies are not kept.
    """

    def __init__(self, vision: Mapping[str, Any], text: Mapping[str, Any], num_classes: int = 3,
                 fusion_layer: int = 6, tokenizer: str | None = None, max_text_len: int = 40) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be at least 2, got {num_classes}")
        self.vision = build_vision_tower(vision)
        self.text = fused_text_encoder(text, fusion_layer, self.vision.width)
        width = self.text.width
        self.cls_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))
        self.tokenizer_name, self.max_text_len = tokenizer, max_text_len

    def logits(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, num_classes] for images (uint8 [B,3,H,W]) and their texts' ids ([CLS] first)."""
        _, image_tokens = self.vision(image)
        hidden = self.text(input_ids, attention_mask, encoder_hidden_states=image_tokens)
        return self.cls_head(hidden[:, 0])

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        logits = self.logits(batch["image"], batch["text_input_ids"], batch["text_attention_mask"])
        loss = F.cross_entropy(logits.float(), torch.as_tensor(batch["label"], device=logits.device))
        return ModelOutput(loss=loss, losses={"cls": loss.detach()})

    @torch.no_grad()
    def predict(self, samples: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """LAVIS's `predict`: {"predictions": logits [B, num_classes]} for `samples["image"]` and the
        strings in `samples["text_input"]` (one per image), cut at `max_text_len` tokens."""
        if self.tokenizer_name is None:
            raise ValueError("predict needs the model's tokenizer (model.tokenizer)")
        image = samples["image"]
        ids, mask = tokenize_texts(self.tokenizer_name, samples["text_input"], self.max_text_len, image.device)
        if ids.shape[0] != image.shape[0]:
            raise ValueError(f"predict: {ids.shape[0]} texts for {image.shape[0]} images")
        return {"predictions": self.logits(image, ids, mask)}
