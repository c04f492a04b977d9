"""ShardLoader on bad data: damaged samples and shards skipped and reported, the bad-sample fraction."""
import io
import re

import pytest
from PIL import Image

from tests.datasets import test_loader
from tests.datasets.test_loader import _all_keys, _stream, _take
from vlforge.datasets.loader import ShardLoader
from vlforge.datasets.shards import DataError
from vlforge.datasets.writer import ShardWriter

demo = test_loader.demo  # the demo dataset fixture, shared with the loader's other tests

# ---------------------------------------------------------------- bad input


def _jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 40), ((53 * i) % 256, (17 * i) % 256, 120)).save(out, format="JPEG", quality=95)
    return out.getvalue()


@pytest.fixture
def bad_shards(tmp_path):
    with ShardWriter(str(tmp_path / "bad-%03d.tar"), max_count=6) as writer:
        for i in range(12):
            image = _jpeg(i)
            meta = {"image_id": f"s{i:02d}", "captions": [f"a square number {i}"]}
            if i == 4:
                image = image[: len(image) // 2]  # truncated JPEG
            if i == 9:
                meta = {"image_id": f"s{i:02d}", "label": 1}  # no captions
            writer.write(f"s{i:02d}", image, meta)
    not_a_tar = tmp_path / "bad-zzz.tar"
    not_a_tar.write_bytes(b"definitely not a tar archive\n" * 50)
    shards = [str(p) for p in writer.shards]
    return [shards[0], str(not_a_tar), shards[1]], shards


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_and_shards_are_skipped_and_reported(demo, bad_shards, num_workers, caplog):
    shard_list, good_shards = bad_shards
    stream = _stream(shard_list, demo, batch_size=4, drop_last=False, shuffle_buffer=3, split_by="sample")
    loader = ShardLoader(stream, num_workers=num_workers, epochs=1)
    with caplog.at_level("WARNING", logger="vlforge"):
        keys = _all_keys(_take(loader))
    # Each event is logged once, as it is met.
    assert sorted(m for m in caplog.messages if m.startswith("data: ")) == sorted(
        f"data: {e}" for e in loader.report.skipped_samples + loader.report.unreadable_shards)

    expected = sorted(f"s{i:02d}" for i in range(12) if i not in (4, 9))
    assert sorted(keys) == expected
    report = loader.report
    skipped = sorted((e.kind, e.shard, e.key) for e in report.skipped_samples)
    assert skipped == [("skipped_sample", good_shards[0], "s04"), ("skipped_sample", good_shards[1], "s09")]
    # Each says what went wrong: the exception's type and message.
    assert all(re.fullmatch(r"[A-Za-z]+(Error|Exception): .+", e.reason) for e in report.skipped_samples)
    assert [(e.kind, e.shard) for e in report.unreadable_shards] == [("unreadable_shard", shard_list[1])]
    lines = report.summary().split("\n")
    assert lines[0] == "2 skipped sample(s), 1 unreadable shard(s)" and len(lines) == 4
    assert lines[1].startswith(f"  unreadable shard: shard {shard_list[1]}: ")
    assert sorted(lines[2:])[0].startswith(f"  skipped sample: shard {good_shards[0]}, sample 's04': ")


def _shard_with_broken(tmp_path, total: int, broken: set[int]) -> str:
    with ShardWriter(str(tmp_path / "mixed-%03d.tar"), max_count=total) as writer:
        for i in range(total):
            image = _jpeg(i)
            writer.write(f"m{i:03d}", image[: len(image) // 3] if i in broken else image,
                         {"image_id": f"m{i:03d}", "captions": [f"a square number {i}"]})
    return str(writer.shards[0])


@pytest.mark.parametrize("total, broken, at", [(12, {1, 5, 7, 10}, "the end of the epoch"), (200, set(range(0, 200, 4)), "100 samples")])
def test_too_many_bad_samples_stop_with_the_report(demo, tmp_path, total, broken, at):
    shard = _shard_with_broken(tmp_path, total, broken)
    loader = ShardLoader(_stream([shard], demo, batch_size=4, drop_last=False), num_workers=0, max_bad_fraction=0.2)
    batches = 0
    with pytest.raises(DataError) as info:
        for _ in loader:
            batches += 1
    message = str(info.value)
    bad, read = (4, 12) if total == 12 else (26, 102)  # judged after the first batch that reaches 100
    assert message.startswith(f"rank 0: {bad} of the {read} samples read ({bad / read:.1%}) could not be used, more "
                              "than data.max_bad_fraction=0.2: stopping rather than training on what is left.")
    assert f"{bad} skipped sample(s)" in message and f"shard {shard}, sample 'm{min(broken):03d}'" in message
    assert batches == (2 if total == 12 else 18)  # the batch that crossed the line is not trained on


def test_bad_samples_at_exactly_the_fraction_train_on(demo, tmp_path):
    shard = _shard_with_broken(tmp_path, 12, {1, 5, 7})  # 3 of 12: exactly 0.25
    loader = ShardLoader(_stream([shard], demo, batch_size=3, drop_last=False), num_workers=0, epochs=1,
                         max_bad_fraction=0.25)
    assert len(_all_keys(_take(loader))) == 9


def test_bad_samples_below_the_fraction_train_on(demo, tmp_path):
    shard = _shard_with_broken(tmp_path, 12, {1, 5, 7, 10})
    loader = ShardLoader(_stream([shard], demo, batch_size=4, drop_last=False), num_workers=0, epochs=2,
                         max_bad_fraction=0.34)
    assert len(_take(loader)) == 4  # two epochs of 8 good samples
    assert loader.report.skips_read == 8 and len(loader.report.skipped_samples) == 4


@pytest.mark.parametrize("num_workers", [0, 2])
def test_all_shards_unreadable_raises_with_report(demo, tmp_path, num_workers):
    shards = []
    for i in range(2):
        path = tmp_path / f"junk-{i}.tar"
        path.write_bytes(b"junk " * 300)
        shards.append(str(path))
    loader = ShardLoader(_stream(shards, demo, split_by="sample"), num_workers=num_workers)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert "2 unreadable shard(s)" in message
    assert all(path in message for path in shards)
    assert len(loader.report.unreadable_shards) == 2
