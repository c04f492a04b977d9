"""BLIP image-text retrieval: ITC over unimodal features, ITM over the image-grounded text encoder."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.core.tokenizers import special_token_id
from vlforge.models.layers.bert import BertTextModel
from vlforge.models.layers.contrastive import (
    DualEncoderFeatures,
    LogitScale,
    contrastive_loss,
    text_groups,
)
from vlforge.models.layers.itm import hard_negative_pairs, itm_loss
from vlforge.models.output import ModelOutput
from vlforge.models.towers.build import build_vision_tower


class BlipRetrieval(DualEncoderFeatures, nn.Module):
    """`vision` / `text` are `build_vision_tower` / BertTextModel arguments; the text encoder cross-attends
    in every layer when given image tokens (ITM) and is unimodal without them (ITC).

    Loss: ITC, exact across ranks, plus ITM on each positive pair, one hard negative text per image and
    one hard negative image per text (mined within the rank's batch). With `match_identical_texts`,
    identically worded texts are positives of each other's images, in ITC's targets (across ranks)
    and never drawn as ITM negatives: LAVIS's `idx` rule with the wording as the id, for template
    captions (the demo's) that repeat across images; off by default, as in BLIP.
    """

    def __init__(
        self,
        vision: Mapping[str, Any],
        text: Mapping[str, Any],
        embed_dim: int = 256,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        enc_token_id: int | str | None = None,
        match_identical_texts: bool = False,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer_name = tokenizer  # for extract_features on strings; training uses the collator's ids
        self.vision = build_vision_tower(vision)
        self.text_encoder = BertTextModel(**{"cross_attention_layers": "all", "encoder_width": self.vision.width, **text})
        width = self.text_encoder.width
        self.vision_proj = nn.Linear(self.vision.width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.logit_scale = LogitScale(init_temperature, max_logit_scale)
        # LAVIS's BLIP marks image-grounded encoding with an [ENC] token in place of [CLS] (an id, or
        # the token, looked up in the tokenizer); None keeps [CLS], as transformers' BLIP does.
        self.enc_token_id = special_token_id(tokenizer, enc_token_id, "enc_token_id")
        self.match_identical_texts = match_identical_texts

    def image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens [B, N, D], what `itm_match_scores` reads; normalised ITC embedding [B, E] from the
        pooled feature (CLS on ViTs)). Retrieval evaluation takes both from one tower forward."""
        pooled, tokens = self.vision(image)
        return tokens, F.normalize(self.vision_proj(pooled), dim=-1)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_features(image)[1]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids, attention_mask)
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] (no match, match) logits for aligned rows of image tokens and texts."""
        if self.enc_token_id is not None:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.enc_token_id
        hidden = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_tokens)
        return self.itm_head(hidden[:, 0])

    def itm_match_scores(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] ITM "match" logits of aligned rows."""
        return self.itm_logits(image_tokens, input_ids, attention_mask)[:, 1]

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
        image_tokens, image_emb = self.image_features(batch["image"])
        text_emb = self.encode_text(ids, mask)
        groups = text_groups(ids, mask) if self.match_identical_texts else None
        scale = self.logit_scale()
        itc = contrastive_loss(image_emb, text_emb, scale, groups)

        same = None if groups is None else groups[:, None] == groups[None, :]
        pairs = hard_negative_pairs((scale * image_emb @ text_emb.t()).detach(), positives=same)
        logits = self.itm_logits(image_tokens[pairs.image_rows], ids[pairs.text_rows], mask[pairs.text_rows])
        itm = itm_loss(logits, pairs)
        loss = itc + itm
        return ModelOutput(loss=loss, losses={"itc": itc.detach(), "itm": itm.detach()},
                           extras={"image_tokens": image_tokens})
