"""A CLIP image tower from transformers (`CLIPVisionModel`), with LLaVA-style feature selection."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vlforge.models.towers.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    AttentionPool,
    PixelNormalize,
    VisionTowerBase,
    check_pool,
)

FEATURE_SELECTS = ("patch", "cls_patch")


class HFCLIPVisionTower(VisionTowerBase):
    """transformers' `CLIPVisionModel`; `forward(uint8 [B,3,H,W])` gives (pooled [B,D], tokens [B,N,D]).

    - `pretrained`: a local directory or hub id for `from_pretrained`; or `config`: the keyword
      arguments of `CLIPVisionConfig` (a randomly initialised tower). Exactly one of them.
    - `feature_layer`: index into the hidden states (0 = the pre-layernormed embeddings, i = after
      encoder layer i). LLaVA's default -2 takes the penultimate layer: the last one is shaped by
      CLIP's contrastive objective toward the pooled CLS, the one before keeps more local detail.
    - `feature_select`: tokens are that layer's patch tokens ("patch") or CLS and patches ("cls_patch").
    - `pool`: "default" is CLIP's pooler output (the last layer's CLS after the post-layernorm, the
      feature its projection was trained on); "cls", "mean" (patch tokens) and "attention" pool the
      selected layer instead.
    - `attn_implementation`: transformers' attention kernel ("sdpa", "eager", ...).
    Freeze, dtype and gradient checkpointing: see `VisionTowerBase`. The model is always built outside
    ZeRO-3's zero.Init: `from_pretrained` and transformers' weight initialisation write into the
    modules after they are constructed, which zero.Init would already have partitioned.
    """

    trunk_name = "model"

    def __init__(
        self,
        pretrained: str | None = None,
        config: Mapping[str, Any] | None = None,
        feature_layer: int = -2,
        feature_select: str = "patch",
        pool: str = "default",
        pool_heads: int | None = None,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        freeze: bool = False,
        dtype: str | None = None,
        grad_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        if (pretrained is None) == (config is None):
            raise ValueError("HFCLIPVisionTower: give exactly one of `pretrained` (a directory or hub id) and `config`")
        if feature_select not in FEATURE_SELECTS:
            raise ValueError(f"vision feature_select={feature_select!r}: expected one of {', '.join(FEATURE_SELECTS)}")
        check_pool(pool)
        self.normalize = PixelNormalize(mean, std)

        def build(target: torch.dtype | None) -> nn.Module:
            from transformers import CLIPVisionConfig, CLIPVisionModel

            if pretrained is not None:
                # An explicit dtype: transformers' default ("auto") would take the checkpoint's.
                return CLIPVisionModel.from_pretrained(pretrained, dtype=target or torch.get_default_dtype(),
                                                       attn_implementation=attn_implementation)
            return CLIPVisionModel(CLIPVisionConfig(**config, attn_implementation=attn_implementation))

        self.model = self._setup_options(freeze, dtype, build, trunk_builds_outside_zero_init=True)
        if grad_checkpointing:
            # Non-reentrant: the reentrant variant gives no parameter gradients when a checkpointed
            # block's inputs do not require grad. transformers checkpoints only in train mode.
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = self.model.config.num_hidden_layers
        if not -(layers + 1) <= feature_layer <= layers:
            raise ValueError(f"vision feature_layer={feature_layer}: the tower has {layers + 1} hidden states")
        self.feature_layer, self.feature_select, self.pool = feature_layer, feature_select, pool
        self.width: int = self.model.config.hidden_size
        self.attention_pool = AttentionPool(self.width, pool_heads) if pool == "attention" else None

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, D], tokens [B, N, D]); N is the number of patches, plus one with cls_patch."""
        with self.trunk_context():
            out = self.model(pixel_values=self.normalize(pixels).to(self.trunk_dtype()), output_hidden_states=True)
            hidden = out.hidden_states[self.feature_layer]
            default = out.pooler_output if self.pool == "default" else None
        (hidden,) = self.finish(hidden)
        tokens = hidden[:, 1:] if self.feature_select == "patch" else hidden
        if default is not None:
            (pooled,) = self.finish(default)
        elif self.pool == "cls":
            pooled = hidden[:, 0]
        elif self.pool == "mean":
            pooled = hidden[:, 1:].mean(dim=1)
        else:
            pooled = self.attention_pool(tokens)
        return pooled, tokens
