"""PixelNormalize, the towers' first step: the pixel dtypes and ranges it takes, and images already
normalised elsewhere passing through marked."""
from __future__ import annotations

import pytest
import torch

from tests.models.towers.test_towers import CLIP_MEAN, CLIP_STD, _pixels
from vlforge import normalized_pixels
from vlforge.models.towers.base import PixelNormalize


def test_pixels_are_uint8_in_0_255_or_float_in_0_1_and_nothing_else():
    normalize = PixelNormalize(CLIP_MEAN.flatten().tolist(), CLIP_STD.flatten().tolist())
    px = _pixels()
    expected = (px.float() / 255.0 - CLIP_MEAN) / CLIP_STD
    torch.testing.assert_close(normalize(px), expected)
    torch.testing.assert_close(normalize(px.float() / 255.0), expected)  # ToTensor's range: the same image
    with pytest.raises(ValueError, match=r"float image must be in \[0, 1\], got values in \[0, 2\d\d\]"):
        normalize(px.float())  # [0, 255] floats were once normalised 255x too bright without a word
    with pytest.raises(ValueError, match="must be in"):
        normalize(expected)  # already normalised: negative values
    with pytest.raises(TypeError, match="torch.int64"):
        normalize(px.long())


def test_pre_normalised_images_pass_through_marked() -> None:
    normalize = PixelNormalize(CLIP_MEAN.flatten().tolist(), CLIP_STD.flatten().tolist())
    px = _pixels()
    normalised = (px.float() / 255.0 - CLIP_MEAN) / CLIP_STD
    marked = normalized_pixels(normalised.double())
    # The mark survives what models do to a batch before the tower (indexing, moving, repeating).
    out = normalize(marked[[1, 0]].to("cpu").repeat_interleave(2, dim=0))
    assert type(out) is torch.Tensor and out.dtype == torch.float32
    torch.testing.assert_close(out, normalised[[1, 0]].repeat_interleave(2, dim=0))
    with pytest.raises(TypeError, match="uint8 pixels go to the model as they are"):
        normalized_pixels(px)
