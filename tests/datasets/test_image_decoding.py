"""A sample's image: JPEGs decoded whole go straight to pixels (torchcodec), the same pixels PIL gives."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlforge.config.data import ImageTransformConfig
from vlforge.datasets import samples
from vlforge.datasets.processors import build_image_transform, rgb_pixels
from vlforge.datasets.samples import SampleError, decode_image, decode_whole_jpeg, jpeg_size, load_image
from vlforge.datasets.shards import RawSample


def _pixels(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 60, size=(height, width))
    return np.stack([x * 255 // width, y * 255 // height, noise], axis=-1).astype(np.uint8)


def _jpeg(width: int = 50, height: int = 36, mode: str = "RGB", **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(_pixels(width, height)).convert(mode).save(out, format="JPEG", **save)
    return out.getvalue()


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "vlforge"  # Make
    return exif.tobytes()


KINDS = {
    "baseline 4:2:0": _jpeg(),
    "progressive": _jpeg(progressive=True),
    "4:4:4, quality 98": _jpeg(subsampling=0, quality=98),
    "odd size": _jpeg(37, 23),
    "grey": _jpeg(mode="L"),
    "CMYK": _jpeg(mode="CMYK"),
    "with EXIF and an ICC profile": _jpeg(exif=_exif(), icc_profile=b"\0" * 300),
}


@pytest.mark.parametrize("kind", KINDS)
def test_jpeg_size_reads_the_frame_header(kind):
    assert jpeg_size(KINDS[kind]) == Image.open(io.BytesIO(KINDS[kind])).size


def test_jpeg_size_of_what_is_not_a_whole_jpeg_is_none():
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    data = KINDS["baseline 4:2:0"]
    frame = next(i for i in range(2, len(data)) if data[i - 1] == 0xFF and data[i] == 0xC0)
    for bad in (b"", png.getvalue(), data[:frame + 4], b"\xff\xd8\x00\x00\x00\x00", b"\xff\xd8\xff\xda\x00\x04"):
        assert jpeg_size(bad) is None, bad[:8]
    # Fill bytes before a marker and a restart marker are stepped over.
    assert jpeg_size(b"\xff\xd8\xff\xff\xd0" + data[2:]) == (50, 36)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [ImageTransformConfig(size=24), ImageTransformConfig(size=50, train=True)])
def test_whole_jpegs_decode_to_pils_pixels(kind, cfg):
    raw = RawSample("k", "shard", {"jpg": KINDS[kind], "png": b"not read"})
    transform = build_image_transform(cfg)
    pixels = decode_whole_jpeg(raw, transform.draft_size)
    assert pixels is not None  # this path is the one under test
    assert pixels.dtype == torch.uint8 and torch.equal(pixels, rgb_pixels(decode_image(raw)))
    torch.manual_seed(0)
    fast = load_image(raw, transform)
    torch.manual_seed(0)
    assert torch.equal(fast, transform(decode_image(raw, transform.draft_size)))


def test_without_torchcodec_pil_decodes(monkeypatch):
    raw = RawSample("k", "shard", {"jpg": KINDS["progressive"]})
    transform = build_image_transform(ImageTransformConfig(size=24))
    expected = load_image(raw, transform)
    monkeypatch.setattr(samples, "_decode_jpeg", None)
    assert decode_whole_jpeg(raw, None) is None
    assert torch.equal(load_image(raw, transform), expected)


def test_a_jpeg_that_draft_decoding_shrinks_goes_to_pil():
    raw = RawSample("k", "shard", {"jpg": _jpeg(100, 72)})
    assert decode_whole_jpeg(raw, (51, 36)) is not None  # 100 // 51 == 1: decoded whole either way
    assert decode_whole_jpeg(raw, (50, 36)) is None  # half scale still covers 50 x 36
    assert load_image(raw, build_image_transform(ImageTransformConfig(size=36))).shape == (3, 36, 36)


def test_other_images_and_callables_go_to_pil():
    png = io.BytesIO()
    Image.fromarray(_pixels(20, 10)).save(png, format="PNG")
    assert decode_whole_jpeg(RawSample("k", "shard", {"png": png.getvalue(), "webp": b"not read"}), None) is None
    # The sample's image is its first file in IMAGE_EXTENSIONS' order, on either path.
    both = RawSample("k", "shard", {"png": png.getvalue(), "jpeg": KINDS["grey"]})
    assert torch.equal(decode_whole_jpeg(both, None), rgb_pixels(decode_image(both)))
    named_jpg = RawSample("k", "shard", {"jpg": png.getvalue()})  # a PNG under .jpg: PIL sniffs the format
    assert decode_whole_jpeg(named_jpg, None) is None
    assert load_image(named_jpg, lambda image: image.size) == (20, 10)
    # A plain callable is given a PIL image, as before.
    assert load_image(RawSample("k", "shard", {"jpg": KINDS["grey"]}), lambda image: image.mode) == "RGB"


def test_the_pixel_limit_still_applies(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 50 x 36 = 1800 > 2 x 600: PIL refuses it
    raw = RawSample("k", "shard", {"jpg": KINDS["baseline 4:2:0"]})
    assert decode_whole_jpeg(raw, None) is None
    with pytest.raises(Image.DecompressionBombError):
        load_image(raw, build_image_transform(ImageTransformConfig(size=24)))


def test_a_truncated_jpeg_is_a_sample_error_saying_so():
    data = KINDS["baseline 4:2:0"]
    raw = RawSample("k", "shard", {"jpg": data[: len(data) // 2]})
    with pytest.raises(SampleError, match=r"^JPEG cannot be decoded: Image is incomplete or truncated\.?$"):
        load_image(raw, build_image_transform(ImageTransformConfig(size=24)))
