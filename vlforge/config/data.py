"""Dataclass schemas of the data nodes that datasets read: the demo dataset, the image transform and
the text processor (the trainer's nodes are in schema.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DemoConfig:
    root: str
    num_train: int = 6000
    num_val: int = 300
    num_test: int = 600
    image_size: int = 64
    samples_per_shard: int = 250
    seed: int = 0
    vocab_size: int = 400

    def validate(self) -> None:
        for name in ("num_train", "num_val", "num_test", "samples_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise ValueError(f"DemoConfig.image_size must be >= 32 to keep shapes recognisable, got {self.image_size}")


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
    # [R, G, B] in 0..255: first pad the image to a square of its longer side with this colour, centred
    # (LLaVA-1.5's image_aspect_ratio=pad: the CLIP mean, [122, 116, 104]); null: no padding.
    pad_to_square: Optional[tuple[int, int, int]] = None
    # JPEGs are decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale that still gives at least the
    # size the transform resizes to (`size`, or `size * resize_ratio`) in both dimensions: libjpeg
    # then skips most of the work. A training crop of a drafted image may be upsampled where the full
    # image's would not (a crop is at least `scale[0]` of the area); set false to always decode whole.
    draft: bool = True


@dataclass
class TextProcessorConfig:
    lowercase: bool = True
    max_words: int = 50
    strip_punctuation: bool = True
