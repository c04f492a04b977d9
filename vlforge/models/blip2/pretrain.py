"""BLIP-2 stage 1: a frozen image tower and a Q-Former trained by ITC, ITM and ITG.

The Q-Former's queries learn to pull from the image what the text needs: ITC aligns the best
matching query with the text, ITM classifies queries+text pairs, ITG generates the text from the
queries alone (the only way the image reaches it), which prepares the queries for stage 2's LM.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.core.tokenizers import special_token_id
from vlforge.models.blip.decoder import language_model_loss, special_token_ids
from vlforge.models.fusion.qformer import QFormer
from vlforge.models.layers.bert import BertLMHead
from vlforge.models.layers.contrastive import (
    DualEncoderFeatures,
    LogitScale,
    contrastive_loss,
    image_text_similarity,
)
from vlforge.models.layers.itm import hard_negative_pairs, itm_loss
from vlforge.models.output import ModelOutput
from vlforge.models.towers.build import build_vision_tower


class QueryImageEncoder(nn.Module):
    """Image tower -> LayerNorm -> Q-Former queries: [B, num_queries, qformer width].

    BLIP-2 keeps the tower frozen (`vision.freeze: true`) and trains a LayerNorm on its output.
    """

    def __init__(self, vision: Mapping[str, Any], qformer: Mapping[str, Any]) -> None:
        super().__init__()
        self.vision = build_vision_tower(vision)
        self.vision_norm = nn.LayerNorm(self.vision.width)
        self.qformer = QFormer(image_width=self.vision.width, **qformer)

    def image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        _, tokens = self.vision(image)
        return self.vision_norm(tokens)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens, query outputs)."""
        tokens = self.image_tokens(image)
        return tokens, self.qformer(tokens)


class Blip2Pretrain(DualEncoderFeatures, nn.Module):
    """Stage-1 BLIP-2. Losses logged as itc, itm and itg; the training loss is their sum.

    `tokenizer` supplies the [DEC] (bos) id that starts ITG's text, as BLIP's decoder does.
    `extract_features(mode="image")` gives one embedding per query, [B, Q, E]; similarities take
    the best query (`image_text_similarity`). `label_smoothing` applies to ITG and
    `itc_label_smoothing` to ITC (LAVIS: 0.1 for both).
    """

    def __init__(
        self,
        vision: Mapping[str, Any],
        qformer: Mapping[str, Any],
        embed_dim: int = 256,
        tokenizer: str | None = None,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        label_smoothing: float = 0.1,
        itc_label_smoothing: float = 0.1,
        bos_token_id: int | str | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__()
        if qformer.get("vocab_size", 30523) is None:
            raise ValueError("stage-1 BLIP-2 trains on text: model.qformer.vocab_size must be set")
        self.encoder = QueryImageEncoder(vision, qformer)
        width = self.encoder.qformer.width
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.lm_head = BertLMHead(width, self.encoder.qformer.word_embeddings.num_embeddings,
                                  tied_embedding=self.encoder.qformer.word_embeddings)
        self.logit_scale = LogitScale(init_temperature, max_logit_scale)
        self.label_smoothing, self.itc_label_smoothing = label_smoothing, itc_label_smoothing
        self.tokenizer_name = tokenizer  # for extract_features on strings; training uses the collator's ids
        bos_token_id = special_token_id(tokenizer, bos_token_id, "bos_token_id")
        self.bos_token_id, _, _, _ = special_token_ids(tokenizer, "", bos_token_id, eos_token_id, pad_token_id, None)

    @property
    def num_queries(self) -> int:
        return self.encoder.qformer.num_queries

    def image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens for ITM, normalised per-query ITC embeddings [B, Q, E])."""
        tokens, queries = self.encoder(image)
        return tokens, F.normalize(self.vision_proj(queries), dim=-1)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_features(image)[1]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder.qformer(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, 2] (no match, match): the ITM head on each query output, averaged over the queries."""
        hidden = self.encoder.qformer(image_tokens, input_ids, attention_mask)
        return self.itm_head(hidden[:, : self.num_queries]).mean(dim=1)

    def itm_match_scores(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.itm_logits(image_tokens, input_ids, attention_mask)[:, 1]

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
        image_tokens, image_emb = self.image_features(batch["image"])
        text_emb = self.encode_text(ids, mask)
        scale = self.logit_scale()
        itc = contrastive_loss(image_emb, text_emb, scale, label_smoothing=self.itc_label_smoothing)

        pairs = hard_negative_pairs((scale * image_text_similarity(image_emb, text_emb)).detach())
        itm = itm_loss(self.itm_logits(image_tokens[pairs.image_rows], ids[pairs.text_rows], mask[pairs.text_rows]), pairs)

        decoder_ids = ids.clone()
        decoder_ids[:, 0] = self.bos_token_id  # [CLS] becomes [DEC]
        hidden = self.encoder.qformer(image_tokens, decoder_ids, mask, causal_text=True)
        logits = self.lm_head(hidden[:, self.num_queries :])
        itg = language_model_loss(logits, decoder_ids, mask, 1, self.label_smoothing)
        return ModelOutput(loss=itc + itm + itg, losses={"itc": itc.detach(), "itm": itm.detach(), "itg": itg.detach()})
