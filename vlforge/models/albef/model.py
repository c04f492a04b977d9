"""ALBEF: align before fuse. ITC with momentum encoders and feature queues, ITM with hard negatives,
MLM, and momentum distillation of the ITC and MLM targets.

The text encoder's first `fusion_layer` layers read text only; the rest cross-attend to the image.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.models.layers.bert import BertLMHead, BertTextModel
from vlforge.models.layers.contrastive import (
    DualEncoderFeatures,
    LogitScale,
    all_gather_rows,
    text_groups,
)
from vlforge.models.layers.itm import hard_negative_pairs, itm_loss
from vlforge.models.output import ModelOutput
from vlforge.models.towers.build import build_vision_tower


def _storages(param: torch.Tensor) -> list[torch.Tensor]:
    """Where this rank keeps a parameter's values: the tensor itself; under ZeRO-3 its partition, plus
    the full tensor when ZeRO-3 keeps it gathered (small "persistent" parameters)."""
    if not hasattr(param, "ds_tensor"):
        return [param.data]
    full = param.data.numel() == param.ds_numel and param.data.numel() > 0
    return [param.ds_tensor, param.data] if full else [param.ds_tensor]


def fused_text_encoder(text: Mapping[str, Any], fusion_layer: int, image_width: int) -> BertTextModel:
    """ALBEF's text encoder: its layers from `fusion_layer` on cross-attend to image tokens of `image_width`."""
    layers = text.get("layers", 12)
    if not 0 < fusion_layer < layers:
        raise ValueError(f"fusion_layer must be between 1 and text.layers-1 ({layers - 1}), got {fusion_layer}")
    return BertTextModel(**{**text, "cross_attention_layers": range(fusion_layer, layers), "encoder_width": image_width})


class _Encoders(nn.Module):
    """The parts ALBEF keeps a momentum copy of."""

    def __init__(self, vision: Mapping[str, Any], text: Mapping[str, Any], embed_dim: int, fusion_layer: int) -> None:
        super().__init__()
        self.vision = build_vision_tower(vision)
        self.text = fused_text_encoder(text, fusion_layer, self.vision.width)
        layers = text.get("layers", 12)
        self.vision_proj = nn.Linear(self.vision.width, embed_dim)
        self.text_proj = nn.Linear(self.text.width, embed_dim)
        self.mlm_head = BertLMHead(self.text.width, text["vocab_size"], tied_embedding=self.text.word_embeddings)
        self.fusion_layer, self.num_layers = fusion_layer, layers

    def image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.vision(image)
        return tokens, F.normalize(self.vision_proj(pooled), dim=-1)

    def text_only(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.text(ids, mask, layers=(0, self.fusion_layer))
        return hidden, F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def fuse(self, text_hidden: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.text(None, mask, encoder_hidden_states=image_tokens, layers=(self.fusion_layer, self.num_layers),
                         hidden_states=text_hidden)


class ALBEF(DualEncoderFeatures, nn.Module):
    """Loss = ITC + ITM + MLM (logged as itc, itm, mlm); `mlm=False` drops MLM, as ALBEF's retrieval
    finetune does (the MLM head is then left untrained).

    Momentum parameters follow the model as m <- momentum * m + (1 - momentum) * p, computed on each
    rank's own storage: under ZeRO-3 that is the rank's partition, laid out as the model parameter's,
    so the update needs no communication. The queues hold the momentum features of every rank's
    samples (all-gathered), so they are identical on every rank.
    """

    def __init__(
        self,
        vision: Mapping[str, Any],
        text: Mapping[str, Any],
        embed_dim: int = 256,
        fusion_layer: int = 6,
        queue_size: int = 65536,
        momentum: float = 0.995,
        alpha: float = 0.4,
        mlm_probability: float = 0.15,
        mlm: bool = True,
        alpha_warmup_steps: int = 0,
        mask_token_id: int = 103,
        special_token_ids: tuple[int, ...] = (0, 101, 102),
        init_temperature: float = 0.07,
        match_identical_texts: bool = False,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer_name = tokenizer  # for extract_features on strings; training uses the collator's ids
        self.model = _Encoders(vision, text, embed_dim, fusion_layer)
        self.momentum_model = _Encoders(vision, text, embed_dim, fusion_layer)
        self.momentum_model.requires_grad_(False)
        self.itm_head = nn.Linear(self.model.text.width, 2)
        self.logit_scale = LogitScale(init_temperature, 100.0)
        self.momentum, self.alpha, self.mlm_probability, self.mlm = momentum, alpha, mlm_probability, mlm
        self.mask_token_id, self.special_token_ids = mask_token_id, tuple(special_token_ids)
        self.vocab_size = text["vocab_size"]
        self.register_buffer("image_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # `match_identical_texts`: identically worded texts (`text_groups`) are positives of each
        # other's images, in the batch and in the queue, in ITC's targets and never ITM negatives. It
        # is LAVIS's `idx` / `idx_queue` rule with the text's wording as the id: for template captions
        # (the demo's), which repeat across images; off by default, as in ALBEF.
        self.match_identical_texts = match_identical_texts
        if match_identical_texts:
            self.register_buffer("group_queue", torch.full((queue_size,), -1, dtype=torch.long))  # -1: no text
        self.register_buffer("momentum_ready", torch.zeros(1, dtype=torch.bool))
        # Training forwards so far: distillation weight alpha ramps up over the first
        # `alpha_warmup_steps` of them (ALBEF ramps it over its first epoch), from a momentum model
        # that knows nothing yet to one worth imitating. A buffer, so a resumed run ramps on exactly.
        self.alpha_warmup_steps = alpha_warmup_steps
        self.register_buffer("forward_steps", torch.zeros(1, dtype=torch.long))
        # Host copies of the two buffers, read from the device once (after construction or a load), so
        # the step does not wait on the GPU to learn where the queue is.
        self._host_ptr: int | None = None
        self._host_ready: bool | None = None
        self._host_steps: int | None = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_ptr = self._host_ready = self._host_steps = None

    def _next_alpha(self) -> float:
        """This forward's distillation weight; counts the forward."""
        if self._host_steps is None:
            self._host_steps = int(self.forward_steps)
        steps = self._host_steps
        self._host_steps += 1
        self.forward_steps.fill_(self._host_steps)
        if not self.alpha_warmup_steps:
            return self.alpha
        return self.alpha * min(1.0, steps / self.alpha_warmup_steps)

    def _pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return zip(self.model.parameters(), self.momentum_model.parameters())

    @torch.no_grad()
    def momentum_update(self) -> None:
        if self._host_ready is None:
            self._host_ready = bool(self.momentum_ready)
        first = not self._host_ready
        stale: list[torch.Tensor] = []
        for param, shadow in self._pairs():
            sources, targets = _storages(param), _storages(shadow)
            for source, target in zip(sources, targets):
                if first:
                    target.copy_(source)
                else:
                    target.mul_(self.momentum).add_(source, alpha=1.0 - self.momentum)
            if len(targets) > len(sources):
                # ZeRO-3 holds the shadow's full tensor but has released the model's (it releases even
                # "persistent" parameters after use while it records its trace: the first step of every
                # process, so the first step after a resume). Only the partition was updated above; the
                # full tensor, which the momentum encoder would run with, is a step behind.
                stale.append(shadow)
        if stale:
            # Drop the stale full tensors: ZeRO-3 gathers them again from the updated partitions when the
            # momentum encoder's modules fetch them.
            stale[0].partition(param_list=stale)
        self.momentum_ready.fill_(True)
        self._host_ready = True

    @torch.no_grad()
    def _enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, groups: torch.Tensor | None) -> None:
        images, texts = all_gather_rows(image_feat), all_gather_rows(text_feat)
        if self._host_ptr is None:
            self._host_ptr = int(self.queue_ptr)
        size, ptr = self.image_queue.shape[1], self._host_ptr
        if size % images.shape[0]:
            raise ValueError(f"queue_size {size} is not a multiple of the global batch {images.shape[0]}")
        self.image_queue[:, ptr : ptr + images.shape[0]] = images.t()
        self.text_queue[:, ptr : ptr + texts.shape[0]] = texts.t()
        if groups is not None:
            self.group_queue[ptr : ptr + texts.shape[0]] = all_gather_rows(groups)
        self._host_ptr = (ptr + images.shape[0]) % size
        self.queue_ptr.fill_(self._host_ptr)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_features(image)[1]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.text_only(input_ids, attention_mask)[1]

    def image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image tokens for ITM, normalised ITC embedding)."""
        return self.model.image(image)

    def itm_match_scores(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.model.text_only(input_ids, attention_mask)
        return self.itm_head(self.model.fuse(hidden, attention_mask, image_tokens)[:, 0])[:, 1]

    def _mask_tokens(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking: 15% of non-special tokens are predicted; of those 80% [MASK], 10% random, 10% kept."""
        labels = ids.clone()
        chosen = torch.bernoulli(torch.full(ids.shape, self.mlm_probability, device=ids.device)).bool()
        for special in self.special_token_ids:
            chosen &= ids != special
        labels[~chosen] = -100
        masked = ids.clone()
        to_mask = torch.bernoulli(torch.full(ids.shape, 0.8, device=ids.device)).bool() & chosen
        masked[to_mask] = self.mask_token_id
        to_random = torch.bernoulli(torch.full(ids.shape, 0.5, device=ids.device)).bool() & chosen & ~to_mask
        masked[to_random] = torch.randint(self.vocab_size, ids.shape, device=ids.device)[to_random]
        return masked, labels

    def forward(self, batch: Mapping[str, Any]) -> ModelOutput:
        ids, mask, image = batch["text_input_ids"], batch["text_attention_mask"], batch["image"]
        scale = self.logit_scale()
        alpha = self._next_alpha()
        image_tokens, image_feat = self.model.image(image)
        text_hidden, text_feat = self.model.text_only(ids, mask)

        with torch.no_grad():
            self.momentum_update()
            _, image_feat_m = self.momentum_model.image(image)
            _, text_feat_m = self.momentum_model.text_only(ids, mask)
            image_all = torch.cat([image_feat_m.t(), self.image_queue.clone()], dim=1)
            text_all = torch.cat([text_feat_m.t(), self.text_queue.clone()], dim=1)
            if self.match_identical_texts:
                groups = text_groups(ids, mask)
                positive = groups[:, None] == torch.cat([groups, self.group_queue.clone()])[None, :]
                targets = positive.float() / positive.sum(dim=1, keepdim=True)
                same = positive[:, : ids.shape[0]]
            else:
                groups = same = None
                targets = torch.zeros(ids.shape[0], image_all.shape[1], device=ids.device)
                targets.fill_diagonal_(1)
            i2t_targets = alpha * (scale * image_feat_m @ text_all).softmax(1) + (1 - alpha) * targets
            t2i_targets = alpha * (scale * text_feat_m @ image_all).softmax(1) + (1 - alpha) * targets
        i2t = -(F.log_softmax(scale * image_feat @ text_all, dim=1) * i2t_targets).sum(1).mean()
        t2i = -(F.log_softmax(scale * text_feat @ image_all, dim=1) * t2i_targets).sum(1).mean()
        itc = (i2t + t2i) / 2
        self._enqueue(image_feat_m, text_feat_m, groups)

        pairs = hard_negative_pairs((scale * image_feat @ text_feat.t()).detach(), positives=same)
        fused = self.model.fuse(text_hidden[pairs.text_rows], mask[pairs.text_rows], image_tokens[pairs.image_rows])
        itm = itm_loss(self.itm_head(fused[:, 0]), pairs)

        if not self.mlm:  # ALBEF's retrieval finetune: ITC + ITM only
            return ModelOutput(loss=itc + itm, losses={"itc": itc.detach(), "itm": itm.detach()})
        masked_ids, mlm_labels = self._mask_tokens(ids)
        hidden_masked, _ = self.model.text_only(masked_ids, mask)
        logits = self.model.mlm_head(self.model.fuse(hidden_masked, mask, image_tokens)).float()
        with torch.no_grad():
            image_tokens_m, _ = self.momentum_model.image(image)
            hidden_m, _ = self.momentum_model.text_only(masked_ids, mask)
            soft = self.momentum_model.mlm_head(self.momentum_model.fuse(hidden_m, mask, image_tokens_m)).float().softmax(-1)
        # Masked means over the scored positions, with no data-dependent branch: a `.any()` test would
        # make every step wait on the device.
        scored = (mlm_labels != -100).float()
        count = scored.sum().clamp(min=1.0)
        hard = (F.cross_entropy(logits.flatten(0, 1), mlm_labels.flatten(), ignore_index=-100, reduction="none")
                * scored.flatten()).sum() / count
        distilled = (-(soft * logits.log_softmax(-1)).sum(-1) * scored).sum() / count
        mlm = (1 - alpha) * hard + alpha * distilled
        loss = itc + itm + mlm
        return ModelOutput(loss=loss, losses={"itc": itc.detach(), "itm": itm.detach(), "mlm": mlm.detach()})
