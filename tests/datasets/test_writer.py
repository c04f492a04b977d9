import json
import os
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from vlforge.datasets.writer import ShardWriter


def _write(pattern, samples, **kwargs) -> ShardWriter:
    with ShardWriter(pattern, **kwargs) as writer:
        for key, data, meta in samples:
            writer.write(key, data, meta)
    return writer


def _samples(n: int, size: int = 100):
    return [(f"s{i:04d}", bytes([i % 256]) * size, {"i": i, "text": "héllo"}) for i in range(n)]


def test_rolls_over_by_count(tmp_path):
    writer = _write(tmp_path / "out-%06d.tar", _samples(25), max_count=10)
    assert [p.name for p in writer.shards] == ["out-000000.tar", "out-000001.tar", "out-000002.tar"]
    assert writer.count == 25
    counts = [len(tarfile.open(p).getnames()) // 2 for p in writer.shards]
    assert counts == [10, 10, 5]


def test_rolls_over_by_bytes_and_keeps_files_under_limit(tmp_path):
    max_bytes = 40_000
    writer = _write(tmp_path / "out-%03d.tar", _samples(30, size=3000), max_bytes=max_bytes)
    assert len(writer.shards) > 1
    assert all(p.stat().st_size <= max_bytes for p in writer.shards)
    assert sum(len(tarfile.open(p).getnames()) for p in writer.shards) == 60


def test_oversized_sample_still_gets_a_shard(tmp_path):
    writer = _write(tmp_path / "out-%03d.tar", _samples(3, size=50_000), max_bytes=10_000)
    assert len(writer.shards) == 3
    assert writer.count == 3


def test_members_and_content_roundtrip_through_tarfile(tmp_path):
    writer = _write(tmp_path / "out-%06d.tar", _samples(3))
    with tarfile.open(writer.shards[0]) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"s{i:04d}.{ext}" for i in range(3) for ext in ("jpg", "json")]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o444 for m in members)
        assert tar.extractfile("s0001.jpg").read() == bytes([1]) * 100
        assert json.loads(tar.extractfile("s0001.json").read()) == {"i": 1, "text": "héllo"}


def test_readable_with_webdataset(tmp_path):
    writer = _write(tmp_path / "out-%06d.tar", _samples(7), max_count=3)
    url = str(tmp_path / "out-{000000..000002}.tar")
    assert [p.name for p in writer.shards][-1] == "out-000002.tar"
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"s{i:04d}" for i in range(7)]
    assert all({"jpg", "json"} <= set(s) for s in samples)
    assert json.loads(samples[4]["json"])["i"] == 4


def test_identical_input_gives_identical_bytes(tmp_path):
    a = _write(tmp_path / "a" / "x-%06d.tar", _samples(12), max_count=5)
    b = _write(tmp_path / "b" / "x-%06d.tar", _samples(12), max_count=5)
    assert [p.read_bytes() for p in a.shards] == [p.read_bytes() for p in b.shards]


def test_no_temp_files_left_after_close(tmp_path):
    _write(tmp_path / "out-%06d.tar", _samples(12), max_count=5)
    assert sorted(os.listdir(tmp_path)) == ["out-000000.tar", "out-000001.tar", "out-000002.tar"]


def test_completed_shards_are_renamed_while_current_one_is_temporary(tmp_path):
    with ShardWriter(tmp_path / "out-%06d.tar", max_count=2) as writer:
        for key, data, meta in _samples(3):
            writer.write(key, data, meta)
        assert writer.shards == [tmp_path / "out-000000.tar"]
        assert sorted(os.listdir(tmp_path)) == ["out-000000.tar", "out-000001.tar.tmp"]


def test_exception_removes_partial_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "out-%06d.tar", max_count=2) as writer:
            for key, data, meta in _samples(3):
                writer.write(key, data, meta)
            raise RuntimeError("boom")
    # The full first shard is kept; the half-written second one never appears as a .tar.
    assert sorted(os.listdir(tmp_path)) == ["out-000000.tar"]


@pytest.mark.parametrize("key", ["", "a.b", "dir/key", "back\\slash"])
def test_rejects_invalid_keys(tmp_path, key):
    with ShardWriter(tmp_path / "out-%06d.tar") as writer:
        with pytest.raises(ValueError, match="invalid sample key"):
            writer.write(key, b"x", {})


def test_rejects_duplicate_keys_naming_them(tmp_path):
    with ShardWriter(tmp_path / "out-%06d.tar", max_count=1) as writer:
        writer.write("sample7", b"x", {})
        with pytest.raises(ValueError, match="sample7"):
            writer.write("sample7", b"y", {})
    assert writer.count == 1


def test_rejects_pattern_without_shard_number(tmp_path):
    with pytest.raises(ValueError, match="%06d"):
        ShardWriter(tmp_path / "out.tar")


def test_long_and_unicode_keys_are_supported(tmp_path):
    keys = ["k" * 150, "ünïcode_key"]
    writer = _write(tmp_path / "out-%06d.tar", [(k, b"img", {"k": k}) for k in keys])
    with tarfile.open(writer.shards[0]) as tar:
        assert tar.getnames() == [f"{keys[0]}.jpg", f"{keys[0]}.json", f"{keys[1]}.jpg", f"{keys[1]}.json"]


def test_write_after_close_fails(tmp_path):
    writer = _write(tmp_path / "out-%06d.tar", _samples(1))
    with pytest.raises(RuntimeError):
        writer.write("late", b"x", {})
    assert Path(writer.shards[0]).exists()
