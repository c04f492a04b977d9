"""Image-text matching through a configurable fusion encoder: the model for comparing fusion designs."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.models.fusion.cross_attention import FusionTextEncoder
from vlforge.models.output import ModelOutput
from vlforge.models.towers.build import build_vision_tower
from vlforge.models.towers.multiscale import MultiScaleVisionTower


class FusionITM(nn.Module):
    """Does this caption describe this image? Each image is paired with its caption (match) and with
    another sample's caption (no match); the fused CLS token feeds a 2-way head.

    `vision` with `layers` builds a MultiScaleVisionTower (hierarchical fusion reads one scale per
    depth), without it a TimmVisionTower; `fusion` holds FusionTextEncoder's switches.
    """

    def __init__(self, vision: Mapping[str, Any], text: Mapping[str, Any], fusion: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        vision = dict(vision)
        if "layers" in vision:
            self.vision: nn.Module = MultiScaleVisionTower(**vision)
            context_width = vision["width"]
        else:
            self.vision = build_vision_tower(vision)
            context_width = self.vision.width
        self.text = FusionTextEncoder(**text, context_width=context_width, **(fusion or {}))
        self.itm_head = nn.Linear(self.text.width, 2)

    def image_context(self, image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.vision(image)
        return out[1] if isinstance(out, tuple) else out

    def itm_logits(self, context: torch.Tensor | list[torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.itm_head(self.text(ids, mask, context)[:, 0])

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
        context = self.image_context(batch["image"])
        shift = torch.roll(torch.arange(ids.shape[0], device=ids.device), 1)  # another sample's caption
        both = [torch.cat([c, c]) for c in context] if isinstance(context, list) else torch.cat([context, context])
        logits = self.itm_logits(both, torch.cat([ids, ids[shift]]), torch.cat([mask, mask[shift]]))
        labels = torch.cat([torch.ones(ids.shape[0]), torch.zeros(ids.shape[0])]).long().to(ids.device)
        loss = F.cross_entropy(logits.float(), labels)
        return ModelOutput(loss=loss, losses={"itm": loss.detach()})
