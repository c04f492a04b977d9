"""Image towers fed uint8 pixels and normalised inside the model: any timm backbone by name, or
transformers' CLIPVisionModel (`vision_clip.py`); `build_vision_tower` picks one from a recipe's
`model.vision` mapping."""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vlforge.models.zero_init import outside_zero_init, zero_init_context

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TOWER_DTYPES: dict[str | None, torch.dtype | None] = {
    None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}
POOLS = ("default", "cls", "mean", "attention")


class PixelNormalize(nn.Module):
    """uint8 [B,3,H,W] -> normalised float; the loaders ship uint8 so workers move 4x fewer bytes."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # The result is in the buffers' dtype. DeepSpeed's bf16/fp16 engine casts parameters but not
        # buffers, so callers cast it to their backbone's parameter dtype.
        return pixels.to(self.scale.dtype) * self.scale - self.shift


class AttentionPool(nn.Module):
    """One learned query attends over the tokens (the attentional pooler of CoCa / open_clip, with a
    single query): a global feature the training can learn to place, unlike CLS or mean pooling.

    Written with plain Linear layers and SDPA rather than nn.MultiheadAttention, whose `out_proj` is
    used without being called, so ZeRO-3 would never gather its weights."""

    def __init__(self, width: int, heads: int | None = None) -> None:
        super().__init__()
        self.heads = heads or max(1, width // 64)
        if width % self.heads:
            raise ValueError(f"attention pool: width {width} is not divisible by heads {self.heads}")
        # Initialised here, in the owner's constructor: under zero.Init a later init would be lost.
        self.query = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.norm = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, D] -> [B, D]."""
        batch, _, width = tokens.shape
        heads, head_dim = self.heads, width // self.heads
        keys, values = self.kv(self.norm(tokens)).chunk(2, dim=-1)
        query = self.q(self.query).expand(batch, -1, -1)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, head_dim).transpose(1, 2)

        pooled = F.scaled_dot_product_attention(split(query), split(keys), split(values))
        return self.out(pooled.transpose(1, 2).reshape(batch, width))


# --- freeze / dtype / checkpointing, common to the towers -------------------------------------------


def _config_error(message: str) -> Exception:
    from vlforge.config.schema import ConfigError  # a ValueError; imported late to keep models light

    return ConfigError(message)


class VisionTowerBase(nn.Module):
    """Options every tower shares, applied to its `trunk` (the pretrained network, not the heads):

    - `freeze`: the trunk's parameters get `requires_grad=False` and the trunk stays in eval mode even
      when the model is put in train mode, so dropout stays off and BatchNorm statistics stay those it
      was trained with. It runs under `torch.no_grad()`: nothing it computes needs a gradient, so no
      activation is kept for backward. New heads (the attention pool) still train.
    - `dtype` ("fp32" | "bf16" | "fp16" | None): the trunk's parameters are held in that dtype and its
      input cast to it, and its outputs are cast back to the dtype of the rest of the model (the
      default dtype, or zero.Init's under ZeRO-3), so a frozen tower can run in bf16 at half the memory
      while the parts being trained stay fp32. None keeps today's behaviour: the trunk follows
      whatever dtype the model is given (by DeepSpeed's bf16/fp16 engine, for instance), and so do its
      outputs. The option is meant for fp32 runs; with trainer.precision bf16/fp16 leave it None,
      since DeepSpeed then decides every parameter's dtype.
      With DeepSpeed (fp32 run): ZeRO-0 trains any combination, though a trainable bf16 trunk is then
      updated in bf16 without an fp32 master copy. ZeRO-1/2 flatten each optimizer parameter group
      into one buffer, so a trainable low-precision trunk that shares a group with fp32 parameters is
      silently promoted to fp32 (detected at the first forward and refused). ZeRO-3's optimizer needs
      one dtype for all trainable parameters (refused when the tower is built). A frozen trunk in
      another dtype works with every stage; under ZeRO-3 it is built outside zero.Init (see
      `outside_zero_init`) so that it keeps its dtype.
    - `grad_checkpointing`: the trunk recomputes each block's activations in backward instead of
      storing them, trading about a third more compute for activation memory that no longer grows
      with depth.
    """

    trunk_name = "backbone"  # the attribute holding the trunk

    def _setup_options(self, freeze: bool, dtype: str | None, build_trunk: Callable[[torch.dtype | None], nn.Module],
                       trunk_builds_outside_zero_init: bool = False) -> nn.Module:
        """Build the trunk with `build_trunk(dtype)` and apply the options; returns the trunk."""
        if dtype not in TOWER_DTYPES:
            raise _config_error(f"model.vision.dtype={dtype!r}: expected one of fp32, bf16, fp16 or null")
        self.frozen = bool(freeze)
        self.tower_dtype: torch.dtype | None = TOWER_DTYPES[dtype]
        zero_init = zero_init_context()
        # What the rest of the model computes in: the dtype its floating parameters are created in.
        self.output_dtype: torch.dtype = zero_init.dtype if zero_init is not None else torch.get_default_dtype()
        target = self.tower_dtype
        outside = trunk_builds_outside_zero_init
        if zero_init is not None:
            if target is not None and target != zero_init.dtype:
                if not self.frozen:
                    raise _config_error(
                        f"model.vision.dtype={dtype} with a trainable tower under ZeRO-3: DeepSpeed's stage-3 "
                        "optimizer flattens all trainable parameters into one "
                        f"{_dtype_name(zero_init.dtype)} buffer, so they must share one dtype. Freeze the tower "
                        "(model.vision.freeze=true), set "
                        "model.vision.dtype=null, or use deepspeed.stage 0-2 with a frozen tower.")
                outside = True
            # A trunk built outside zero.Init is partitioned later as it is: give it zero.Init's dtype
            # unless the tower asks for another, so that trainable parameters share one dtype.
            if outside and target is None:
                target = zero_init.dtype
        with outside_zero_init() if outside else contextlib.nullcontext():
            trunk = build_trunk(target)
            if target is not None and (zero_init is None or outside):  # zero.Init already made its dtype
                trunk.to(target)
            if self.frozen:
                trunk.requires_grad_(False)
                trunk.eval()
        return trunk

    @property
    def trunk(self) -> nn.Module:
        return getattr(self, self.trunk_name)

    def train(self, mode: bool = True) -> "VisionTowerBase":
        super().train(mode)
        if self.frozen:
            self.trunk.train(False)  # dropout off and BatchNorm statistics fixed, whatever the parent does
        return self

    def trunk_dtype(self) -> torch.dtype:
        """The dtype the trunk runs in (its parameters'), checked against `model.vision.dtype`."""
        actual = next(self.trunk.parameters()).dtype
        if self.tower_dtype is not None and actual != self.tower_dtype:
            raise _config_error(
                f"model.vision.dtype={_dtype_name(self.tower_dtype)} but the tower's parameters are now "
                f"{_dtype_name(actual)}: something cast them after the tower was built. DeepSpeed ZeRO-1/2 "
                "promote a trainable tower that shares an optimizer parameter group with fp32 parameters, and "
                "a bf16/fp16 engine (trainer.precision) casts every parameter. Freeze the tower "
                "(model.vision.freeze=true), use deepspeed.stage=0, or set model.vision.dtype=null.")
        return actual

    def trunk_context(self) -> contextlib.AbstractContextManager:
        return torch.no_grad() if self.frozen else contextlib.nullcontext()

    def finish(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Trunk outputs in the rest of the model's dtype (only when `dtype` is set, see the class doc)."""
        if self.tower_dtype is None:
            return features
        return tuple(f.to(self.output_dtype) for f in features)


def _dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, value in TOWER_DTYPES.items() if value == dtype), str(dtype))


def check_tower_precision(vision: Mapping[str, Any], precision: str) -> None:
    """Refuse `model.vision.dtype` outside fp32 runs, before the model is built (for the trainer's
    config validation; `precision` already resolved from "auto"). A bf16/fp16 engine casts every
    parameter to its dtype, so the tower's outputs, cast back to fp32, would meet bf16 layers."""
    dtype = vision.get("dtype")
    if dtype is not None and precision != "fp32":
        raise _config_error(f"model.vision.dtype={dtype} needs trainer.precision=fp32 (got {precision}); with "
                            "bf16/fp16 training DeepSpeed sets the tower's dtype: set model.vision.dtype=null")


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"vision pool={pool!r}: expected one of {', '.join(POOLS)}")


def sincos_position_code(height: int, width: int, dim: int) -> torch.Tensor:
    """[height*width, dim] fixed position code, rows first: half the channels encode the row, half the
    column, each as sines and cosines at geometrically spaced frequencies (MAE's 2-D code)."""
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    parts = []
    for coordinate in (rows.flatten(), cols.flatten()):
        angles = coordinate[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


class TimmVisionTower(VisionTowerBase):
    """A timm backbone without its classifier; `forward` gives (pooled [B,D], tokens [B,N,D]).

    Tokens are the backbone's final features (for ViTs, CLS and other prefix tokens included; a CNN's
    [B, D, H, W] map becomes H*W tokens). `pool` chooses pooled:
    - "default": timm's own head pooling (`global_pool`; the CLS token on a ViT), as before;
    - "cls": the first token (ViTs with a class token only);
    - "mean": the mean of the patch tokens, without the prefix (CLS, register) tokens;
    - "attention": an `AttentionPool` (a learned query) over all tokens, trained with the model.
    Freeze, dtype and gradient checkpointing: see `VisionTowerBase`.
    """

    def __init__(
        self,
        name: str,
        pretrained: bool | str = False,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        norm_eps: float | None = None,
        pool: str = "default",
        pool_heads: int | None = None,
        freeze: bool = False,
        dtype: str | None = None,
        grad_checkpointing: bool = False,
        token_norm: bool = False,
        token_position: bool = False,
        channels_last: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        """`token_norm` puts a LayerNorm on the tokens (a ViT's end with one; a CNN's map does not).
        `token_position` adds a fixed 2-D sine-cosine code of each token's place to a CNN map's tokens
        (after `token_norm`), so text attending to them can tell where things are (ViT tokens carry
        learned position embeddings already, and the option is refused for them).
        `norm_eps` sets the LayerNorm epsilon of ViT-style backbones (BLIP and HF ViTs use 1e-5,
        timm's default is 1e-6); `pool_heads` the attention pool's heads (width // 64 by default);
        `channels_last` runs a convolutional trunk in NHWC memory order (timm's `--channels-last`):
        oneDNN's and cuDNN's convolutions are faster on it (resnet10t's training step 1.18x on CPU here);
        the values are the same. A ViT gains nothing from it.
        Other keyword arguments go to `timm.create_model`."""
        super().__init__()
        _check_pool(pool)
        if norm_eps is not None:
            timm_kwargs["norm_layer"] = partial(nn.LayerNorm, eps=norm_eps)
        pretrained_file = pretrained if isinstance(pretrained, str) else None
        self.normalize = PixelNormalize(mean, std)

        def create(_: torch.dtype | None) -> nn.Module:
            return timm.create_model(
                name,
                pretrained=bool(pretrained),
                pretrained_cfg_overlay=dict(file=pretrained_file) if pretrained_file else None,
                num_classes=0,
                **timm_kwargs,
            )

        # timm loads pretrained weights after building the model: inside zero.Init they would land
        # in empty placeholders, so a pretrained trunk is built whole and partitioned by the engine.
        self.backbone = self._setup_options(freeze, dtype, create, trunk_builds_outside_zero_init=bool(pretrained))
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        # Only the input is converted: given an NHWC input the convolutions run NHWC whatever the
        # weights' order. The weights stay NCHW: DeepSpeed's parameter broadcast at initialize views
        # each one as flat bytes, which fails on a channels_last weight.
        self.channels_last = channels_last
        self.width: int = self.backbone.num_features
        self.pool = pool
        self.num_prefix_tokens: int = getattr(self.backbone, "num_prefix_tokens", 0)
        if pool == "cls" and not getattr(self.backbone, "has_class_token", self.num_prefix_tokens > 0):
            raise ValueError(f"vision pool=cls: timm model {name!r} has no class token; use mean or attention")
        self.attention_pool = AttentionPool(self.width, pool_heads) if pool == "attention" else None
        self.token_norm = nn.LayerNorm(self.width) if token_norm else None
        if token_position and self.num_prefix_tokens:
            raise ValueError(f"vision token_position: timm model {name!r} is a ViT; its tokens carry positions already")
        if token_position and self.width % 4:
            raise ValueError(f"vision token_position needs a width divisible by 4, {name!r} has {self.width}")
        self.token_position = token_position
        self._position_codes: dict[tuple, torch.Tensor] = {}  # per (grid, device, dtype): built once

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, D], tokens [B, N, D])."""
        with self.trunk_context():
            images = self.normalize(pixels).to(self.trunk_dtype())
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            features = self.backbone.forward_features(images)
            tokens = features.flatten(2).transpose(1, 2) if features.ndim == 4 else features
            grid = features.shape[-2:] if features.ndim == 4 else None
            pooled = self.backbone.forward_head(features, pre_logits=True) if self.pool == "default" else None
        if pooled is None:
            (tokens,) = self.finish(tokens)
        else:
            pooled, tokens = self.finish(pooled, tokens)
        if self.token_norm is not None:
            tokens = self.token_norm(tokens)
        if self.token_position:
            if grid is None:  # a ViT without a class token passes the constructor's check
                raise ValueError("vision token_position: the backbone gives tokens, not a CNN map; "
                                 "its tokens carry positions already")
            key = (tuple(grid), tokens.device, tokens.dtype)
            if key not in self._position_codes:
                self._position_codes[key] = sincos_position_code(*grid, self.width).to(tokens)
            tokens = tokens + self._position_codes[key]
        if self.pool == "cls":
            pooled = tokens[:, 0]
        elif self.pool == "mean":
            # A CNN's map has no prefix tokens, so its mean is over every position.
            pooled = tokens[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.pool == "attention":
            pooled = self.attention_pool(tokens)
        return pooled, tokens


class MultiScaleVisionTower(nn.Module):
    """Token maps from several depths of a timm backbone (`forward_intermediates`), brought to one
    `width` by a feature-pyramid neck: a lateral projection per scale plus the coarser scale's output,
    upsampled, added top-down. `forward` returns [B, N_i, width] per scale, finest first."""

    def __init__(
        self,
        name: str,
        layers: Sequence[int],
        width: int,
        pretrained: bool = False,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        self.normalize = PixelNormalize(mean, std)
        self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
        self.layers, self.width = list(layers), width
        with torch.no_grad():
            size = getattr(self.backbone, "default_cfg", {}).get("input_size", (3, 224, 224))[1:]
            size = timm_kwargs.get("img_size", size)
            size = (size, size) if isinstance(size, int) else tuple(size)
            probe = self.backbone.forward_intermediates(torch.zeros(1, 3, *size), indices=self.layers,
                                                        intermediates_only=True)
        self.lateral = nn.ModuleList(nn.Conv2d(f.shape[1], width, kernel_size=1) for f in probe)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        # Cast to the backbone's dtype: a bf16/fp16 DeepSpeed engine casts parameters, not buffers.
        images = self.normalize(pixels).to(next(self.backbone.parameters()).dtype)
        maps = self.backbone.forward_intermediates(images, indices=self.layers, intermediates_only=True)
        pyramid: list[torch.Tensor] = []
        above: torch.Tensor | None = None
        for lateral, feature in reversed(list(zip(self.lateral, maps))):
            level = lateral(feature)
            if above is not None:
                level = level + F.interpolate(above, size=level.shape[-2:], mode="nearest")
            pyramid.append(level)
            above = level
        return [level.flatten(2).transpose(1, 2) for level in reversed(pyramid)]


VISION_KINDS = ("timm", "hf_clip")


def build_vision_tower(config: Mapping[str, Any]) -> nn.Module:
    """The tower a recipe's `model.vision` mapping names by `kind` ("timm" when absent, or "hf_clip");
    the other keys are that tower's constructor arguments."""
    options = dict(config)
    kind = options.pop("kind", "timm")
    if kind == "timm":
        return TimmVisionTower(**options)
    if kind == "hf_clip":
        from vlforge.models.vision_clip import HFCLIPVisionTower  # imports transformers only when asked

        return HFCLIPVisionTower(**options)
    raise _config_error(f"model.vision.kind={kind!r}: expected one of {', '.join(VISION_KINDS)}")
