"""Bad data does not stop a run: skipped samples and unreadable shards are counted and named."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.e2e.conftest import SMALL_DEMO, check, launch, python_cmd


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_shard(path: Path, samples: list[tuple[str, bytes, dict]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, meta in samples:
            for ext, data in (("jpg", image), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_bad_samples_and_shards_are_reported(e2e_env: dict[str, str], tmp_path: Path) -> None:
    good = [(f"s{i:03d}", _jpeg((40 * (i % 6), 90, 200)), {"captions": [f"a picture of a large red circle {i}"]})
            for i in range(24)]
    truncated = _jpeg((10, 200, 10))[:300]
    _write_shard(tmp_path / "part-a.tar", good[:12] + [("broken_jpeg", truncated, {"captions": ["a square"]})])
    _write_shard(tmp_path / "part-b.tar", good[12:] + [("no_caption", _jpeg((0, 0, 0)), {"image_id": "x"})])
    (tmp_path / "part-c.tar").write_text("this is not a tar file\n")

    result = check(launch(python_cmd(
        "recipe=clip_demo", *SMALL_DEMO, f"run_dir={tmp_path / 'run'}",
        f"data.train.shards='{tmp_path}/part-{{a,b,c}}.tar'", "data.batch_size=4", "data.num_workers=1",
        "trainer.max_steps=8", "trainer.eval_at_end=false", "trainer.save_at_end=false",
    ), e2e_env))
    assert "2 skipped sample(s), 1 unreadable shard(s)" in result.output, result.output[-3000:]
    assert f"unreadable shard: shard {tmp_path / 'part-c.tar'}" in result.output
    assert f"shard {tmp_path / 'part-a.tar'}, sample 'broken_jpeg'" in result.output
    assert f"shard {tmp_path / 'part-b.tar'}, sample 'no_caption'" in result.output
    assert "missing field 'captions'" in result.output


@pytest.mark.slow
def test_more_bad_samples_than_data_max_bad_fraction_stop_the_run(e2e_env: dict[str, str], tmp_path: Path) -> None:
    good = [(f"s{i:03d}", _jpeg((40 * (i % 6), 90, 200)), {"captions": [f"a picture of a large red circle {i}"]})
            for i in range(12)]
    broken = [(f"b{i:03d}", _jpeg((10, 200, 10))[:300], {"captions": ["a square"]}) for i in range(2)]
    _write_shard(tmp_path / "part-a.tar", good[:6] + broken + good[6:])
    result = launch(python_cmd(
        "recipe=clip_demo", *SMALL_DEMO, f"run_dir={tmp_path / 'run'}", f"data.train.shards={tmp_path}/part-a.tar",
        "data.batch_size=4", "data.num_workers=0", "data.max_bad_fraction=0.1", "trainer.max_steps=8",
        "trainer.eval_at_end=false", "trainer.save_at_end=false",
    ), e2e_env)
    assert result.returncode != 0
    assert ("rank 0: 2 of the 14 samples read (14.3%) could not be used, more than data.max_bad_fraction=0.1"
            in result.output), result.output[-3000:]
    assert f"shard {tmp_path / 'part-a.tar'}, sample 'b000'" in result.output


@pytest.mark.slow
def test_all_shards_unreadable_fails_clearly(e2e_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "junk-0.tar").write_text("nope")
    result = launch(python_cmd(
        "recipe=clip_demo", *SMALL_DEMO, f"run_dir={tmp_path / 'run'}", f"data.train.shards={tmp_path}/junk-0.tar",
        "data.num_workers=0", "trainer.max_steps=2",
    ), e2e_env)
    assert result.returncode != 0
    assert "no batch could be made from 1 shard(s)" in result.output
    assert "junk-0.tar" in result.output
