"""The tar reader under the shard stream: plain ustar headers read directly, everything else by tarfile,
the same files either way."""
from __future__ import annotations

import io
import tarfile

import pytest

from vlforge.datasets import tar_files
from vlforge.datasets.tar_files import iter_tar_files


def _archive(members: list[tuple[str, bytes | str | None]], fmt: int = tarfile.PAX_FORMAT, mode: str = "w") -> bytes:
    """A tar of (name, bytes) files, (name, None) directories and (name, "->target") symlinks."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode=mode, format=fmt) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content[2:]
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _by_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _ours(stream) -> list[tuple[str, bytes]]:  # noqa: ANN001
    return [(name, read()) for name, read in iter_tar_files(stream)]


class Trickle(io.RawIOBase):
    """A pipe that gives at most `step` bytes per read."""

    def __init__(self, data: bytes, step: int = 7) -> None:
        self.data, self.step, self.at = data, step, 0

    def read(self, size: int = -1) -> bytes:
        size = self.step if size is None or size < 0 else min(size, self.step)
        chunk = self.data[self.at:self.at + size]
        self.at += len(chunk)
        return chunk


SHARD = [("k000.jpg", b"\xff\xd8" + bytes(range(256)) * 3), ("k000.json", b'{"caption": "a"}'),
         ("k001.jpg", b""), ("k001.json", b"x" * 512), ("sub/dir/k002.txt", "é".encode() * 600)]
LONG = "d" * 120 + "/" + "n" * 90 + ".jpg"  # ustar splits it into prefix and name; GNU and pax need headers

ARCHIVES = {
    "ustar": _archive(SHARD, tarfile.USTAR_FORMAT),
    "pax": _archive(SHARD),
    "gnu": _archive(SHARD, tarfile.GNU_FORMAT),
    "ustar prefix": _archive([*SHARD, (LONG, b"long")], tarfile.USTAR_FORMAT),
    "gnu long name": _archive([*SHARD, ("x" * 150 + ".jpg", b"long"), ("k9.jpg", b"after")], tarfile.GNU_FORMAT),
    "pax long name": _archive([("y" * 150 + ".jpg", b"long"), *SHARD]),
    "non-ascii name (pax)": _archive([("café.jpg", b"c"), *SHARD]),
    "directories and links": _archive([("a", None), ("a/k0.jpg", b"1"), ("a/ln.jpg", "->k0.jpg"), *SHARD]),
    "gzip": _archive(SHARD, mode="w:gz"),
    "a name of exactly 100 bytes": _archive([("e" * 96 + ".jpg", b"full"), *SHARD], tarfile.USTAR_FORMAT),
}


def _old_style(members: list[tuple[str, bytes]]) -> bytes:
    """A tar whose entries have type NUL (pre-POSIX regular files; a name ending in "/" is a directory)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.type, info.size = tarfile.AREGTYPE, len(content)
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _not_utf8_name() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tar:
        info = tarfile.TarInfo("caf\xe9.jpg")  # written as the byte 0xE9, which is not UTF-8
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    return out.getvalue()


ARCHIVES["old-style types"] = _old_style([("olddir/", b""), ("olddir/k0.jpg", b"old"), *SHARD[:2]])
ARCHIVES["a name that is not UTF-8"] = _not_utf8_name()


@pytest.mark.parametrize("kind", ARCHIVES)
@pytest.mark.parametrize("trickle", [False, True])
def test_the_files_are_tarfiles(kind, trickle):
    data = ARCHIVES[kind]
    expected = _by_tarfile(data)
    assert len(expected) >= (1 if kind == "a name that is not UTF-8" else 3)
    assert _ours(Trickle(data) if trickle else io.BytesIO(data)) == expected


def test_plain_shards_are_read_without_tarfile_and_the_rest_with_it(monkeypatch):
    def refuse(*args):  # noqa: ANN002
        raise AssertionError("tarfile was asked to read a plain ustar archive")

    monkeypatch.setattr(tar_files, "_tarfile_files", refuse)
    for kind in ("ustar", "pax", "gnu", "ustar prefix", "a name of exactly 100 bytes", "old-style types",
                 "a name that is not UTF-8"):
        assert _ours(io.BytesIO(ARCHIVES[kind])) == _by_tarfile(ARCHIVES[kind]), kind
        assert _ours(Trickle(ARCHIVES[kind])) == _by_tarfile(ARCHIVES[kind]), kind  # a pipe's short reads
    with pytest.raises(AssertionError, match="tarfile was asked"):
        _ours(io.BytesIO(ARCHIVES["gzip"]))


def test_a_file_whose_data_is_not_asked_for_is_skipped():
    names = [name for name, _ in iter_tar_files(io.BytesIO(ARCHIVES["ustar"]))]
    assert names == [name for name, _ in SHARD]


def test_a_name_comes_before_its_data_is_read():
    data = ARCHIVES["ustar"]
    cut = data.index(b"k001.json") + 512 + 100  # inside k001.json's data
    files = iter_tar_files(io.BytesIO(data[:cut]))
    assert [name for name, _ in [next(files), next(files), next(files)]] == ["k000.jpg", "k000.json", "k001.jpg"]
    name, read = next(files)
    assert name == "k001.json"
    with pytest.raises(tarfile.ReadError, match="^unexpected end of data$"):
        read()


def test_a_damaged_later_header_is_an_error_not_a_quiet_end():
    data = bytearray(ARCHIVES["ustar"])
    header = data.index(b"k001.jpg")
    data[header + 148] ^= 0x01  # its checksum no longer holds
    files = iter_tar_files(io.BytesIO(bytes(data)))
    assert [(name, read()) for name, read in [next(files), next(files)]] == SHARD[:2]
    with pytest.raises(tarfile.ReadError):
        next(files)
    # Reading the whole stream, tarfile itself ends there without a word.
    assert _by_tarfile(bytes(data)) == SHARD[:2]
