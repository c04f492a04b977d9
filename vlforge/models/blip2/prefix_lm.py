"""What BLIP-2's stage-2 models share: the image tower and Q-Former, a transformers LM (frozen by
default), and the projection that turns the Q-Former's queries into LM inputs placed before text."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from vlforge.models.blip2.pretrain import QueryImageEncoder
from vlforge.models.layers.zero_init import outside_zero_init


class QueryPrefixLM(nn.Module):
    """`encoder` (tower -> LayerNorm -> Q-Former, with no text parts: stage 2 feeds it none),
    `language_model` (built by `build_lm` from the `language_model` node) and `language_projection`.
    A frozen LM stays in eval mode, so its dropout is off, as BLIP-2 trains only the Q-Former, the
    tower's LayerNorm and the projection."""

    def __init__(self, vision: Mapping[str, Any], qformer: Mapping[str, Any], language_model: Mapping[str, Any],
                 build_lm: Callable[..., nn.Module], freeze_language_model: bool) -> None:
        super().__init__()
        self.encoder = QueryImageEncoder(vision, {**qformer, "vocab_size": None})
        # transformers initialises (and from_pretrained loads) weights after building each module,
        # which zero.Init's empty placeholders would swallow: the LM is built whole, and
        # deepspeed.initialize partitions it, broadcasting rank 0's values.
        with outside_zero_init():
            self.language_model = build_lm(**language_model)
        self.language_projection = nn.Linear(self.encoder.qformer.width, self.language_model.config.hidden_size)
        self.freeze_language_model = freeze_language_model
        if freeze_language_model:
            self.language_model.requires_grad_(False)
            self.language_model.eval()

    def train(self, mode: bool = True) -> QueryPrefixLM:
        super().train(mode)
        if self.freeze_language_model:
            self.language_model.eval()
        return self

    def visual_prefix(self, image: torch.Tensor) -> torch.Tensor:
        """[B, num_queries, LM width]: the inputs the LM reads before the text."""
        return self.language_projection(self.encoder(image)[1])

    def _inputs(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the visual prefix then the embedded ids [B, Q + T, width], their mask): the LM's input."""
        prefix = self.visual_prefix(image)
        # With a device_map the LM's embeddings may sit on another device than the Q-Former.
        embed = self.language_model.get_input_embeddings()
        text = embed(input_ids.to(embed.weight.device))
        embeds = torch.cat([prefix.to(device=text.device, dtype=text.dtype), text], dim=1)
        attention_mask = attention_mask.to(text.device)
        mask = torch.cat([torch.ones(prefix.shape[:2], dtype=attention_mask.dtype, device=text.device),
                          attention_mask], dim=1)
        return embeds, mask
