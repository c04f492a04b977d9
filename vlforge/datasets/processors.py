"""Per-sample image and text processors run inside DataLoader workers."""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from vlforge.config.data import ImageTransformConfig, TextProcessorConfig


def rgb_pixels(image: Image.Image) -> torch.Tensor:
    """PIL image of any mode (L, P, RGBA, CMYK...) -> RGB uint8 tensor [3, H, W] over the image's own
    H x W x 3 layout (channels last in memory): torch's uint8 antialiased resize runs its vectorised
    kernel on that layout, several times faster than PIL's resize."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


class PadToSquare:
    """uint8 [3, H, W] -> [3, S, S], S = max(H, W): the image centred (offsets rounded down, as
    LLaVA's expand2square pastes it) on a square of `fill`, kept channels-last in memory."""

    def __init__(self, fill: Sequence[int]) -> None:
        if len(fill) != 3 or not all(0 <= int(v) <= 255 for v in fill):
            raise ValueError(f"pad_to_square must be an [R, G, B] colour in 0..255, got {list(fill)}")
        self.fill = torch.tensor([int(v) for v in fill], dtype=torch.uint8)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        if height == width:
            return image
        side = max(height, width)
        square = self.fill.repeat(side, side, 1).permute(2, 0, 1)
        top, left = (side - height) // 2, (side - width) // 2
        square[:, top:top + height, left:left + width] = image
        return square

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fill={self.fill.tolist()})"


class Contiguous:
    """The usual [3, H, W] layout, which the collate stacks and workers ship."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ResizedCropTensor:
    """uint8 [3, H, W] -> [3, size, size]: torchvision's RandomResizedCrop, its crop drawn the same way
    (`get_params`, from torch's generator) and resized the same way, called directly: the v2 class's
    per-call dispatch costs more than the crop itself on small images."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float],
                 interpolation: InterpolationMode) -> None:
        self.size, self.scale, self.ratio, self.interpolation = size, list(scale), list(ratio), interpolation

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        return TF.resized_crop_image(image, top, left, height, width, [self.size, self.size],
                                     interpolation=self.interpolation, antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, {self.interpolation})"


class HorizontalFlipTensor:
    """uint8 [3, H, W] mirrored left-right with probability 1/2, drawn as torchvision's
    RandomHorizontalFlip draws it."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image if torch.rand(1) >= 0.5 else image.flip(-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ImageTransform:
    """An image -> uint8 tensor [3, size, size], the steps applied in order to its pixels. The image is a
    PIL image of any mode or the RGB uint8 tensor [3, H, W] a decoder gave (fastest channels last in
    memory, as `rgb_pixels` and torchcodec's decoder lay it out). `draft_size`: the smallest (width,
    height) a JPEG may be decoded at for this transform (None: decode whole); `load_image` applies it."""

    def __init__(self, steps: list[Callable], draft_size: tuple[int, int] | None) -> None:
        self.steps, self.draft_size = steps, draft_size

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        out: Any = image if isinstance(image, torch.Tensor) else rgb_pixels(image)
        for step in self.steps:
            out = step(out)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(draft_size={self.draft_size}, [{', '.join(map(repr, self.steps))}])"


def build_image_transform(cfg: ImageTransformConfig) -> ImageTransform:
    """PIL image -> uint8 tensor [3, size, size]; normalisation is left to the model so workers ship uint8."""
    if cfg.size < 1:
        raise ValueError(f"size must be positive, got {cfg.size}")
    for name in ("scale", "ratio"):
        low_high = tuple(getattr(cfg, name))
        if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
            raise ValueError(f"{name} must be a (low, high) pair with 0 < low <= high, got {low_high}")
    bicubic = InterpolationMode.BICUBIC
    # The crops, resizes and flips below run on the uint8 pixels (ImageTransform makes a PIL image those).
    steps: list[Callable] = []
    if cfg.pad_to_square is not None:
        steps.append(PadToSquare(cfg.pad_to_square))
    if cfg.train:
        steps.append(ResizedCropTensor(cfg.size, tuple(cfg.scale), tuple(cfg.ratio), bicubic))
        if cfg.hflip:
            steps.append(HorizontalFlipTensor())
        if cfg.randaugment:
            # Its rotations and shears interpolate bilinearly (torchvision's tensor affine has no
            # bicubic; LAVIS's RandomAugment warps bilinearly too).
            steps.append(v2.RandAugment(num_ops=cfg.randaugment_n, magnitude=cfg.randaugment_m,
                                        interpolation=InterpolationMode.BILINEAR))
    elif cfg.resize_ratio == 1.0 and not cfg.center_crop:
        steps.append(v2.Resize((cfg.size, cfg.size), interpolation=bicubic, antialias=True))
    else:
        if cfg.resize_ratio < 1.0:
            raise ValueError(f"resize_ratio must be >= 1.0 (smaller would need padding), got {cfg.resize_ratio}")
        steps.append(v2.Resize(round(cfg.size * cfg.resize_ratio), interpolation=bicubic, antialias=True))
        steps.append(v2.CenterCrop(cfg.size))
    steps.append(Contiguous())
    # What the first resize needs of its input: at least its output size in both dimensions.
    needed = cfg.size if cfg.train or (cfg.resize_ratio == 1.0 and not cfg.center_crop) else round(cfg.size * cfg.resize_ratio)
    return ImageTransform(steps, (needed, needed) if cfg.draft else None)


# The punctuation set LAVIS' BlipCaptionProcessor replaces; apostrophes, commas and '?' survive.
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")

_WHITESPACE = re.compile(r"\s+")


class TextProcessor:
    """Normalise a caption the way LAVIS' BlipCaptionProcessor does. (A prompt prefix is the
    collator's job, `data.prompts`, so that truncation never cuts it and its length is known.)"""

    def __init__(self, cfg: TextProcessorConfig | None = None) -> None:
        self.cfg = cfg or TextProcessorConfig()
        if self.cfg.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.cfg.max_words}")

    def __call__(self, text: str) -> str:
        cfg = self.cfg
        if cfg.lowercase:
            text = text.lower()
        if cfg.strip_punctuation:
            text = _PUNCTUATION.sub(" ", text)
        words = _WHITESPACE.sub(" ", text).strip().split(" ")
        return " ".join(words[: cfg.max_words])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg!r})"
