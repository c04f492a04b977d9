"""Per-sample image and text processors run inside DataLoader workers."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2


@dataclass
class ImageTransformConfig:
    size: int = 224
    train: bool = False
    # RandomResizedCrop area fraction and aspect-ratio ranges (train only).
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    randaugment: bool = False
    randaugment_n: int = 2
    randaugment_m: int = 9
    # Eval: resize the shorter side to size * resize_ratio, then center-crop `size`.
    # 1.0 resizes straight to size x size (aspect ratio not kept), as BLIP-style eval does, unless
    # center_crop is set (CLIP and timm eval: shorter side to size, then the central square).
    resize_ratio: float = 1.0
    center_crop: bool = False


class ConvertRGB:
    """Convert any PIL mode (L, P, RGBA, CMYK...) to RGB; a class rather than a lambda so it pickles."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_image_transform(cfg: ImageTransformConfig) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> uint8 tensor [3, size, size]; normalisation is left to the model so workers ship uint8."""
    if cfg.size < 1:
        raise ValueError(f"size must be positive, got {cfg.size}")
    for name in ("scale", "ratio"):
        low_high = tuple(getattr(cfg, name))
        if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
            raise ValueError(f"{name} must be a (low, high) pair with 0 < low <= high, got {low_high}")
    bicubic = InterpolationMode.BICUBIC
    steps: list[Callable] = [ConvertRGB()]
    if cfg.train:
        steps.append(
            v2.RandomResizedCrop(
                cfg.size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), interpolation=bicubic, antialias=True
            )
        )
        if cfg.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if cfg.randaugment:
            steps.append(v2.RandAugment(num_ops=cfg.randaugment_n, magnitude=cfg.randaugment_m, interpolation=bicubic))
    elif cfg.resize_ratio == 1.0 and not cfg.center_crop:
        steps.append(v2.Resize((cfg.size, cfg.size), interpolation=bicubic, antialias=True))
    else:
        if cfg.resize_ratio < 1.0:
            raise ValueError(f"resize_ratio must be >= 1.0 (smaller would need padding), got {cfg.resize_ratio}")
        steps.append(v2.Resize(round(cfg.size * cfg.resize_ratio), interpolation=bicubic, antialias=True))
        steps.append(v2.CenterCrop(cfg.size))
    # PILToTensor gives a plain tensor (not a tv_tensors.Image), which default_collate stacks as-is.
    steps += [v2.PILToTensor(), v2.ToDtype(torch.uint8, scale=False)]
    return v2.Compose(steps)


@dataclass
class TextProcessorConfig:
    lowercase: bool = True
    max_words: int = 50
    strip_punctuation: bool = True


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
