import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from vlforge.config.data import ImageTransformConfig, TextProcessorConfig
from vlforge.datasets.processors import TextProcessor, build_image_transform
from vlforge.datasets.samples import decode_image, load_image
from vlforge.datasets.shards import RawSample


def _image(width: int = 80, height: int = 60, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


@pytest.mark.parametrize(
    "cfg",
    [
        ImageTransformConfig(size=32),
        ImageTransformConfig(size=32, resize_ratio=256 / 224),
        ImageTransformConfig(size=32, train=True),
        ImageTransformConfig(size=32, train=True, hflip=True, randaugment=True),
    ],
)
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_outputs_uint8_chw_tensor(cfg, mode):
    out = build_image_transform(cfg)(_image(mode=mode))
    assert type(out) is torch.Tensor
    assert out.dtype == torch.uint8
    assert out.shape == (3, 32, 32)
    assert out.max() > out.min()  # real pixel content, not an all-zero or rescaled image


def test_eval_resize_without_crop_keeps_pixel_values():
    flat = Image.new("RGB", (50, 20), (10, 200, 30))
    out = build_image_transform(ImageTransformConfig(size=16))(flat)
    assert out.shape == (3, 16, 16)
    assert out[:, 8, 8].tolist() == [10, 200, 30]


def test_eval_center_crop_takes_the_middle():
    # Left half black, right half white: a centre crop of a 2:1 image shows both halves.
    image = Image.new("RGB", (128, 64), (0, 0, 0))
    image.paste((255, 255, 255), (64, 0, 128, 64))
    out = build_image_transform(ImageTransformConfig(size=32, resize_ratio=1.25))(image)
    assert out.shape == (3, 32, 32)
    assert out[0, 16, 2] < 20 and out[0, 16, 29] > 235


def test_clip_style_center_crop_at_ratio_one():
    # Shorter side to exactly `size`, then the central square: a 2:1 image loses its outer quarters.
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (16, 0, 48, 32))  # the central 32 x 32 square is white
    out = build_image_transform(ImageTransformConfig(size=16, center_crop=True))(image)
    assert out.shape == (3, 16, 16) and out.min() > 235
    squashed = build_image_transform(ImageTransformConfig(size=16))(image)
    assert squashed[0, 8, 0] < 20  # without center_crop the black sides are squeezed in


@pytest.mark.parametrize("height, width, top, left", [(3, 6, 1, 0), (6, 3, 0, 1), (2, 4, 1, 0), (4, 4, 0, 0)])
def test_pad_to_square_centres_the_image_on_the_fill_colour(height, width, top, left):
    # LLaVA-1.5's expand2square: the longer side kept, the image pasted at offset (long - short) // 2.
    pixels = np.random.RandomState(0).randint(0, 256, (height, width, 3), dtype=np.uint8)
    side = max(height, width)
    out = build_image_transform(ImageTransformConfig(size=side, center_crop=True, pad_to_square=(122, 116, 104),
                                                     draft=False))(Image.fromarray(pixels))
    assert out.shape == (3, side, side) and out.dtype == torch.uint8
    expected = np.empty((side, side, 3), dtype=np.uint8)
    expected[:] = (122, 116, 104)
    expected[top:top + height, left:left + width] = pixels
    assert torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1))


def test_pad_to_square_refuses_a_colour_out_of_range():
    with pytest.raises(ValueError, match=r"pad_to_square must be an \[R, G, B\] colour in 0..255, got \[300, 0, 0\]"):
        build_image_transform(ImageTransformConfig(pad_to_square=(300, 0, 0)))


def test_eval_is_deterministic():
    transform = build_image_transform(ImageTransformConfig(size=24, resize_ratio=1.2))
    assert torch.equal(transform(_image()), transform(_image()))


def test_train_is_random():
    transform = build_image_transform(ImageTransformConfig(size=24, train=True, scale=(0.2, 0.5)))
    outputs = [transform(_image()) for _ in range(5)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.parametrize("hflip", [False, True])
def test_train_crop_and_flip_are_torchvisions(hflip):
    # The training transform draws and applies its crop and flip as torchvision's classes do, so a
    # recipe's augmentation is the one its scale/ratio mean in torchvision, seed for seed.
    cfg = ImageTransformConfig(size=24, train=True, scale=(0.2, 1.0), ratio=(0.6, 1.6), hflip=hflip)
    ours = build_image_transform(cfg)
    steps = [v2.PILToTensor(), v2.RandomResizedCrop(24, scale=(0.2, 1.0), ratio=(0.6, 1.6),
                                                     interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    theirs = v2.Compose(steps + ([v2.RandomHorizontalFlip()] if hflip else []))
    image, differing = _image(), 0
    for seed in range(40):
        torch.manual_seed(seed)
        got = ours(image)
        torch.manual_seed(seed)
        expected = theirs(image)
        assert torch.equal(got, expected), seed
        differing += not torch.equal(got, ours(image))
    assert differing >= 35  # the draws are real: another draw gives another crop


def test_transform_pickles_for_dataloader_workers():
    cfg = ImageTransformConfig(size=24, train=True, hflip=True, randaugment=True)
    restored = pickle.loads(pickle.dumps(build_image_transform(cfg)))
    assert restored(_image()).shape == (3, 24, 24)
    eval_transform = build_image_transform(ImageTransformConfig(size=24))
    assert torch.equal(pickle.loads(pickle.dumps(eval_transform))(_image()), eval_transform(_image()))


@pytest.mark.parametrize("field, value", [("scale", (0.5,)), ("scale", (1.0, 0.5)), ("ratio", (0.0, 1.0))])
def test_bad_crop_ranges_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        build_image_transform(ImageTransformConfig(size=24, train=True, **{field: value}))


def test_resize_ratio_below_one_is_rejected():
    with pytest.raises(ValueError, match="resize_ratio"):
        build_image_transform(ImageTransformConfig(size=24, resize_ratio=0.8))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A Dog running on the BEACH.", "a dog running on the beach"),
        ('The "cat" (tabby) sat: on; the ~mat*!#', "the cat tabby sat on the mat"),
        ("  lots   of\tspace\n\n", "lots of space"),
        ("it's a dog, isn't it?", "it's a dog, isn't it?"),
        ("", ""),
    ],
)
def test_text_normalisation_matches_lavis(text, expected):
    assert TextProcessor()(text) == expected


def test_max_words_truncates():
    processor = TextProcessor(TextProcessorConfig(max_words=3))
    assert processor("one two three four five") == "one two three"


def test_normalisation_can_be_switched_off():
    processor = TextProcessor(TextProcessorConfig(lowercase=False, strip_punctuation=False))
    assert processor("Keep  THIS.") == "Keep THIS."


def test_text_processor_pickles():
    processor = TextProcessor(TextProcessorConfig(max_words=2))
    assert pickle.loads(pickle.dumps(processor))("A B C") == "a b"


def _photo_jpeg(width: int = 640, height: int = 480) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("cfg, decoded", [
    (ImageTransformConfig(size=224, train=True), (320, 240)),  # half scale still covers 224 x 224
    (ImageTransformConfig(size=224), (320, 240)),
    (ImageTransformConfig(size=100, resize_ratio=1.2, center_crop=True), (160, 120)),  # covers the 120 resize
    (ImageTransformConfig(size=384, train=True), (640, 480)),  # 320 x 240 would not
    (ImageTransformConfig(size=224, draft=False), (640, 480)),
])
def test_jpegs_decode_at_the_smallest_scale_the_transform_allows(cfg, decoded):
    raw = RawSample("k", "shard", {"jpg": _photo_jpeg()})
    transform = build_image_transform(cfg)
    assert decode_image(raw, transform.draft_size).size == decoded
    assert load_image(raw, transform).shape == (3, cfg.size, cfg.size)


def test_draft_decoding_changes_the_pixels_little():
    raw = RawSample("k", "shard", {"jpg": _photo_jpeg()})
    drafted = load_image(raw, build_image_transform(ImageTransformConfig(size=224))).float()
    whole = load_image(raw, build_image_transform(ImageTransformConfig(size=224, draft=False))).float()
    assert (drafted - whole).abs().mean() < 2.0  # of 255
