"""Shard spec expansion and tar reading (vlforge.datasets.shards): globs, brace ranges, truncated shards."""
import io
import random
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlforge.datasets.shards import DataError, DataEvent, ShardStream, _stable_seed, expand_shard_spec, iter_shard
from vlforge.datasets.writer import ShardWriter


def _jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 24), ((37 * i) % 256, 90, 200)).save(out, format="JPEG")
    return out.getvalue()


def _write_shard(path_pattern: str, n: int, prefix: str = "k") -> list[Path]:
    with ShardWriter(path_pattern, max_count=n) as writer:
        for i in range(n):
            writer.write(f"{prefix}{i:03d}", _jpeg(i), {"captions": [f"caption {i}"], "i": i})
    return writer.shards


# ---------------------------------------------------------------- expand_shard_spec


def test_expand_brace_range_keeps_order_and_zero_padding(tmp_path):
    assert expand_shard_spec(f"{tmp_path}/a-{{000..003}}.tar") == [f"{tmp_path}/a-{i:03d}.tar" for i in range(4)]


def test_expand_glob_is_sorted(tmp_path):
    for name in ("b-2.tar", "b-0.tar", "b-10.tar", "b-1.tar", "other.tar"):
        (tmp_path / name).write_bytes(b"")
    expected = sorted(str(tmp_path / n) for n in ("b-2.tar", "b-0.tar", "b-10.tar", "b-1.tar"))
    assert expand_shard_spec(f"{tmp_path}/b-*.tar") == expected
    assert expand_shard_spec(f"{tmp_path}/b-?.tar") == sorted(str(tmp_path / f"b-{i}.tar") for i in range(3))


def test_expand_double_colon_list_concatenates_parts_in_order(tmp_path):
    (tmp_path / "g-1.tar").write_bytes(b"")
    (tmp_path / "g-0.tar").write_bytes(b"")
    spec = f"{tmp_path}/x-{{1..2}}.tar::{tmp_path}/g-*.tar::/elsewhere/single.tar"
    assert expand_shard_spec(spec) == [
        f"{tmp_path}/x-1.tar",
        f"{tmp_path}/x-2.tar",
        str(tmp_path / "g-0.tar"),
        str(tmp_path / "g-1.tar"),
        "/elsewhere/single.tar",
    ]


def test_expand_glob_matching_nothing_names_the_pattern(tmp_path):
    (tmp_path / "a-0.tar").write_bytes(b"")
    pattern = f"{tmp_path}/nothing-*.tar"
    with pytest.raises(DataError, match="nothing-\\*\\.tar"):
        expand_shard_spec(f"{tmp_path}/a-*.tar::{pattern}")


# ---------------------------------------------------------------- iter_shard


def test_iter_shard_groups_members_by_key(tmp_path):
    path = tmp_path / "grouped.tar"
    members = [
        ("s1.jpg", b"img1"),
        ("README", b"ignored"),  # no extension: not part of any sample
        ("s1.json", b'{"a": 1}'),
        ("s1.seg.png", b"mask1"),  # key is up to the first dot; extension is the rest, lower-cased
        ("s2.JPG", b"img2"),
        ("s2.json", b'{"a": 2}'),
        ("sub/dir/s3.jpg", b"img3"),  # directory part belongs to the key
        ("sub/v1.2 final/s4.jpg", b"img4"),  # a dot or a space in a directory name is not the extension
        ("noextension", b"ignored"),
    ]
    with tarfile.open(path, "w") as tar:
        dir_info = tarfile.TarInfo("sub")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    events = []
    samples = list(iter_shard(str(path), events))
    assert events == []
    assert [(s.key, s.shard, s.files) for s in samples] == [
        ("s1", str(path), {"jpg": b"img1", "json": b'{"a": 1}', "seg.png": b"mask1"}),
        ("s2", str(path), {"jpg": b"img2", "json": b'{"a": 2}'}),
        ("sub/dir/s3", str(path), {"jpg": b"img3"}),
        ("sub/v1.2 final/s4", str(path), {"jpg": b"img4"}),
    ]


def test_iter_shard_streams_from_a_pipe(tmp_path):
    # A pipe cannot seek: the tar is read as a stream, as from cloud storage (pipe:aws s3 cp ... -).
    (shard,) = _write_shard(str(tmp_path / "p-%03d.tar"), 3)
    events = []
    samples = list(iter_shard(f"pipe:cat {shard}", events))
    assert events == [] and [s.key for s in samples] == ["k000", "k001", "k002"]
    assert samples[2].files["jpg"] == _jpeg(2)


def test_iter_shard_reads_writer_output_completely(tmp_path):
    (shard,) = _write_shard(str(tmp_path / "w-%03d.tar"), 5)
    events = []
    samples = list(iter_shard(str(shard), events))
    assert events == []
    assert [s.key for s in samples] == [f"k{i:03d}" for i in range(5)]
    assert all(s.files["jpg"] == _jpeg(i) for i, s in enumerate(samples))


def _sample_starts(path: Path) -> list[int]:
    """Offset of each sample's first header (samples are k000, k001, ... with .jpg then .json)."""
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers() if m.name.endswith(".jpg")]


def _cut_positions(path: Path) -> dict[str, int]:
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    size = path.stat().st_size
    return {
        "half_of_file": size // 2,
        "inside_jpg_data": members["k003.jpg"].offset_data + 100,
        "inside_json_header": members["k003.json"].offset + 200,
        "between_jpg_and_json": members["k003.json"].offset,
        "at_sample_boundary": members["k004.jpg"].offset,
        "inside_jpg_header": members["k004.jpg"].offset + 17,
    }


@pytest.mark.parametrize(
    "where",
    ["half_of_file", "inside_jpg_data", "inside_json_header", "between_jpg_and_json", "at_sample_boundary",
     "inside_jpg_header"],
)
def test_truncated_shard_yields_complete_samples_and_reports_once(tmp_path, where):
    (shard,) = _write_shard(str(tmp_path / "full-%03d.tar"), 8)
    data = shard.read_bytes()
    cut = _cut_positions(shard)[where]
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[:cut])

    events = []
    samples = list(iter_shard(str(truncated), events))

    # A sample is known complete once the header of the next sample was read in full; the sample
    # torn by the cut (or one whose end cannot be confirmed) is never yielded half-read: it is
    # reported as skipped, by key, after the shard.
    starts = _sample_starts(shard)
    expected = [i for i in range(8) if i + 1 < 8 and starts[i + 1] + tarfile.BLOCKSIZE <= cut]
    torn = max(i for i in range(8) if starts[i] + tarfile.BLOCKSIZE <= cut)
    assert expected, "cut too early for this test to mean anything"
    assert [s.key for s in samples] == [f"k{i:03d}" for i in expected]
    for i, sample in zip(expected, samples):
        assert set(sample.files) == {"jpg", "json"}
        assert sample.files["jpg"] == _jpeg(i)
    assert [(e.kind, e.shard, e.key) for e in events] == [
        ("unreadable_shard", str(truncated), ""), ("skipped_sample", str(truncated), f"k{torn:03d}")]
    assert str(truncated) in str(events[0])
    # What ended the shard: a cut inside a member's data, or (at or in a header) no end-of-archive marker.
    assert events[0].reason == ("ReadError: unexpected end of data" if where == "inside_jpg_data" else
                                f"ReadError: truncated: {'truncated' if 'header' in where else 'empty'} header "
                                "(no end-of-archive marker)")
    assert events[1].reason == "torn by the damage that ended the shard"


def test_non_tar_file_reports_unreadable_and_yields_nothing(tmp_path):
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(b"this is not a tar archive, just some text\n" * 40)
    events = []
    assert list(iter_shard(str(bogus), events)) == []
    assert [(e.kind, e.shard, e.reason) for e in events] == [("unreadable_shard", str(bogus), "ReadError: invalid header")]


@pytest.mark.parametrize("content", [b"", b"short"])
def test_empty_or_tiny_file_reports_unreadable(tmp_path, content):
    bogus = tmp_path / "tiny.tar"
    bogus.write_bytes(content)
    events = []
    assert list(iter_shard(str(bogus), events)) == []
    assert [(e.kind, e.shard) for e in events] == [("unreadable_shard", str(bogus))]


def test_missing_file_reports_unreadable(tmp_path):
    missing = str(tmp_path / "missing.tar")
    events = []
    assert list(iter_shard(missing, events)) == []
    assert [(e.kind, e.shard) for e in events] == [("unreadable_shard", missing)]


def test_expand_an_empty_spec_or_part_names_no_shard(tmp_path):
    with pytest.raises(DataError) as info:
        expand_shard_spec("")
    assert str(info.value) == "shard spec '' names no shard"
    assert expand_shard_spec(f"::{tmp_path}/a.tar") == [f"{tmp_path}/a.tar"]


def test_expand_leaves_a_pipe_command_unglobbed():
    assert expand_shard_spec("pipe:cat /data/a-*.tar") == ["pipe:cat /data/a-*.tar"]
    # Without a glob character a name stays as written, even one that does not exist (yet).
    assert expand_shard_spec("/nowhere/XL-000.tar::https://host/XX.tar") == ["/nowhere/XL-000.tar", "https://host/XX.tar"]


def test_data_events_read_as_sentences():
    assert str(DataEvent("skipped_sample", "s.tar", "k7", "bad jpeg")) == "skipped sample: shard s.tar, sample 'k7': bad jpeg"
    assert str(DataEvent("unreadable_shard", "s.tar", "", "EOFError")) == "unreadable shard: shard s.tar: EOFError"


# ---------------------------------------------------------------- per-sample randomness


def _draws(urls: list[str], seed: int = 0) -> dict[str, tuple[float, float]]:
    """key -> (torch draw, python draw) each sample's build saw."""
    build = lambda raw: {"key": raw.key, "draw": (torch.rand(1).item(), random.random())}
    stream = ShardStream(urls, build, lambda rows: {"rows": list(rows)}, 1, drop_last=False, shuffle_shards=False, seed=seed)
    return {row["key"]: row["draw"] for batch in stream for row in batch["rows"]}


def test_a_sample_s_randomness_follows_the_sample_not_its_directory_or_neighbours(tmp_path):
    # Every sample has the same bytes; only keys, shard names and seeds tell them apart.
    for folder in ("a", "b/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        with ShardWriter(str(tmp_path / folder / "train-%06d.tar"), max_count=3) as writer:
            for i in range(3):
                writer.write(f"k{i}", _jpeg(0), {"same": True})
    (tmp_path / "b" / "deeper" / "train-000000.tar").rename(tmp_path / "b" / "deeper" / "other-000000.tar")
    here = _draws([str(tmp_path / "a" / "train-000000.tar")])
    assert len(set(here.values())) == 3  # one draw per key
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "train-000000.tar").write_bytes((tmp_path / "a" / "train-000000.tar").read_bytes())
    assert _draws([str(moved / "train-000000.tar")]) == here  # the shard's name counts, not its folder
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(moved)
        assert _draws(["train-000000.tar"]) == here  # named relative to the working directory
    assert set(_draws([str(tmp_path / "b" / "deeper" / "other-000000.tar")]).values()).isdisjoint(here.values())
    assert set(_draws([str(tmp_path / "a" / "train-000000.tar")], seed=1).values()).isdisjoint(here.values())


def test_per_sample_seeds_stay_what_they_were():
    # A resumed run after an upgrade augments each sample as before only if this number never changes.
    assert _stable_seed(0, 1, "train-000000.tar", "k") == 1475134985696179572


def test_a_stream_drops_a_last_partial_batch_unless_told_not_to(tmp_path):
    (shard,) = _write_shard(str(tmp_path / "d-%03d.tar"), 5)
    build = lambda raw: {"key": raw.key}

    def sizes(**kwargs):
        stream = ShardStream([str(shard)], build, lambda rows: {"n": len(rows)}, 2, shuffle_shards=False, **kwargs)
        return [batch["n"] for batch in stream]

    assert sizes() == [2, 2] and sizes(drop_last=False) == [2, 2, 1]
