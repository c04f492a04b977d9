"""Image-caption shards as users already have them: img2dataset's webdataset output (`key.jpg`,
`key.txt`, `key.json` of download metadata) and open_clip's convention (`key.jpg` and `key.txt`
alone) train without re-sharding."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlforge.config.data import ImageTransformConfig
from vlforge.datasets.processors import TextProcessor, build_image_transform
from vlforge.datasets.samples import ImageTextSample, SampleError
from vlforge.datasets.shards import iter_shard


def _jpeg(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _img2dataset_shard(path: Path, captions: list[str]) -> str:
    """One shard as img2dataset writes it (output_format=webdataset, caption_col set): 9-digit keys,
    the caption in the .txt and again in the .json beside the download metadata."""
    members = []
    for i, caption in enumerate(captions):
        key, image = f"00000{i:04d}", _jpeg(i)
        meta = {"url": f"https://example.com/{i}.jpg", "key": key, "status": "success", "error_message": None,
                "width": 64, "height": 48, "original_width": 640, "original_height": 480, "exif": "{}",
                "sha256": hashlib.sha256(image).hexdigest(), "caption": caption}
        members += [(f"{key}.jpg", image), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]
    return _write_tar(path, members)


@pytest.fixture
def sample() -> ImageTextSample:
    return ImageTextSample(build_image_transform(ImageTransformConfig(size=32, train=False)), TextProcessor(), train=False)


def test_img2dataset_shards_train_as_written(tmp_path: Path, sample: ImageTextSample) -> None:
    captions = ["A red bus on a street.", "Two dogs play in snow", "a café, at night"]
    raws = list(iter_shard(_img2dataset_shard(tmp_path / "00000.tar", captions), []))
    assert [raw.key for raw in raws] == ["000000000", "000000001", "000000002"]
    out = [sample(raw) for raw in raws]
    assert [o["captions"] for o in out] == [[TextProcessor()(c)] for c in captions]
    assert out[0]["image"].shape == (3, 32, 32) and out[0]["image_id"] == "000000000"


def test_open_clip_shards_of_image_and_txt_alone(tmp_path: Path, sample: ImageTextSample) -> None:
    url = _write_tar(tmp_path / "shard-000000.tar", [("a.jpg", _jpeg(0)), ("a.txt", b"  a small cat \n"),
                                                      ("b.jpg", _jpeg(1)), ("b.txt", "un chat noir".encode())])
    out = [sample(raw) for raw in iter_shard(url, [])]
    assert [o["captions"] for o in out] == [["a small cat"], ["un chat noir"]]
    training = ImageTextSample(build_image_transform(ImageTransformConfig(size=32, train=True)), TextProcessor())
    assert training(next(iter_shard(url, [])))["text"] == "a small cat"


def test_the_json_caption_wins_and_a_sample_without_any_caption_is_refused(tmp_path: Path) -> None:
    training = ImageTextSample(build_image_transform(ImageTransformConfig(size=32, train=True)), TextProcessor())
    url = _write_tar(tmp_path / "s.tar", [
        ("a.jpg", _jpeg(0)), ("a.txt", b"the txt"), ("a.json", json.dumps({"captions": ["the json"]}).encode()),
        ("b.jpg", _jpeg(1)), ("b.json", json.dumps({"url": "https://example.com/b.jpg"}).encode()),
        ("c.jpg", _jpeg(2)), ("c.txt", b"\xff\xfe not utf-8"), ("d.jpg", _jpeg(3))])
    a, b, c, d = iter_shard(url, [])
    assert training(a)["text"] == "the json"
    with pytest.raises(SampleError, match="missing field 'captions'"):
        training(b)  # download metadata without a caption, and no .txt
    with pytest.raises(SampleError, match="txt is not UTF-8"):
        training(c)
    with pytest.raises(SampleError, match=r"no json or txt file among \['jpg'\]"):
        training(d)
