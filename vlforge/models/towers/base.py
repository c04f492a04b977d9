"""What every image tower shares: uint8 pixels normalised inside the model, the attention pool, and
the freeze / dtype / gradient-checkpointing options applied to a tower's trunk."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.core.errors import ConfigError
from vlforge.models.layers.zero_init import outside_zero_init, zero_init_context

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TOWER_DTYPES: dict[str | None, torch.dtype | None] = {
    None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}

POOLS = ("default", "cls", "mean", "attention")


class NormalizedPixels(torch.Tensor):
    """Images already normalised with the model's mean and std, as LAVIS's, open_clip's and
    transformers' image processors return them: the towers take them as they are. Made by
    `normalized_pixels`; indexing, `.to()` and the like keep the mark."""


def normalized_pixels(images: torch.Tensor) -> NormalizedPixels:
    """Mark float images [B,3,H,W] as already normalised (the model's mean and std applied), for a
    model that otherwise takes uint8 in [0, 255] or float in [0, 1] and normalises them itself:
    `model.generate({"image": normalized_pixels(lavis_vis_processor(img)[None])})`."""
    if not images.is_floating_point():
        raise TypeError(f"normalized_pixels: normalised images are floating point, got {images.dtype}; "
                        "uint8 pixels go to the model as they are")
    return images.as_subclass(NormalizedPixels)


class PixelNormalize(nn.Module):
    """Pixels [B,3,H,W] -> normalised float: uint8 in [0, 255] (what the loaders ship, so workers move
    4x fewer bytes) or float in [0, 1] (torchvision's ToTensor); anything else is refused with the
    range it has, rather than normalised into nonsense (a float in [0, 255] would be 255x too bright).
    Images marked with `normalized_pixels` pass through, in the buffers' dtype."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # The result is in the buffers' dtype. DeepSpeed's bf16/fp16 engine casts parameters but not
        # buffers, so callers cast it to their backbone's parameter dtype.
        if isinstance(pixels, NormalizedPixels):
            return pixels.as_subclass(torch.Tensor).to(self.scale.dtype)
        if pixels.dtype == torch.uint8:
            return pixels.to(self.scale.dtype) * self.scale - self.shift
        if not pixels.is_floating_point():
            raise TypeError(f"image pixels: expected uint8 in [0, 255] or float in [0, 1], got {pixels.dtype}")
        low, high = pixels.aminmax()  # one host sync, on the float path only (the loaders ship uint8)
        if low < 0 or high > 1:
            raise ValueError(f"image pixels: a float image must be in [0, 1], got values in [{low.item():.4g}, "
                             f"{high.item():.4g}] (uint8 in [0, 255] is taken as is; an image already normalised "
                             "with the mean and std goes in as vlforge.normalized_pixels(images))")
        return pixels.to(self.scale.dtype) * (self.scale * 255.0) - self.shift


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
            raise ConfigError(f"model.vision.dtype={dtype!r}: expected one of fp32, bf16, fp16 or null")
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
                    raise ConfigError(
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
            raise ConfigError(
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
        raise ConfigError(f"model.vision.dtype={dtype} needs trainer.precision=fp32 (got {precision}); with "
                            "bf16/fp16 training DeepSpeed sets the tower's dtype: set model.vision.dtype=null")


def check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"vision pool={pool!r}: expected one of {', '.join(POOLS)}")
