"""Write WebDataset-compatible tar shards: one `{key}.jpg` + `{key}.json` pair per sample."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from types import TracebackType

_BLOCK = tarfile.BLOCKSIZE
# tarfile pads the finished archive to a multiple of RECORDSIZE and appends two zero blocks.
_RECORD = tarfile.RECORDSIZE
_END_OF_ARCHIVE = 2 * _BLOCK
_FORMAT = tarfile.PAX_FORMAT
_ENCODING = "utf-8"


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so identical samples give byte-identical shards on any machine.
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _member_size(info: tarfile.TarInfo) -> int:
    """Exact bytes a member occupies: its header (plus any PAX header for long names) and padded data."""
    if info.name.isascii() and len(info.name) <= 100 and info.size < 8**11:
        header = _BLOCK  # fits a plain ustar header; skip building it twice on the hot path
    else:
        header = len(info.tobuf(_FORMAT, _ENCODING, "surrogateescape"))
    return header + -(-info.size // _BLOCK) * _BLOCK


def _final_archive_size(content_bytes: int) -> int:
    return -(-(content_bytes + _END_OF_ARCHIVE) // _RECORD) * _RECORD


def validate_key(key: str) -> None:
    """Raise ValueError unless `key` can be a WebDataset sample key (readers split on the first dot)."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid sample key {key!r}: must be a non-empty string")
    for bad in (".", "/", "\\", "\0"):
        if bad in key:
            raise ValueError(f"invalid sample key {key!r}: must not contain {bad!r}")


class ShardWriter:
    """Context manager that spreads samples over numbered tar shards.

    A new shard starts when adding a sample would exceed `max_count` samples or make the
    shard file larger than `max_bytes`; a single oversized sample still gets its own shard.
    Each shard is written as `name.tar.tmp` and renamed to `name.tar` once complete, so a
    crashed writer never leaves a truncated `.tar` that a reader would pick up.
    """

    def __init__(self, pattern: str | Path, max_count: int = 10000, max_bytes: int = int(3e9)) -> None:
        pattern = str(pattern)
        try:
            distinct = (pattern % 0) != (pattern % 1)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"shard pattern {pattern!r} needs one integer field such as %06d") from exc
        if not distinct:
            raise ValueError(f"shard pattern {pattern!r} needs one integer field such as %06d")
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.pattern = pattern
        self.max_count = int(max_count)
        self.max_bytes = int(max_bytes)
        self._shards: list[Path] = []
        self._keys: set[str] = set()
        self._count = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._shard_count = 0
        self._shard_bytes = 0
        self._closed = False

    @property
    def shards(self) -> list[Path]:
        """Completed shard files, in write order."""
        return list(self._shards)

    @property
    def count(self) -> int:
        """Samples written so far, across all shards."""
        return self._count

    def write(self, key: str, image_bytes: bytes, meta: dict) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        validate_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if not isinstance(image_bytes, (bytes, bytearray, memoryview)):
            raise TypeError(f"image_bytes for {key!r} must be bytes, got {type(image_bytes).__name__}")
        if not isinstance(meta, dict):
            raise TypeError(f"meta for {key!r} must be a dict, got {type(meta).__name__}")
        json_bytes = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        image_bytes = bytes(image_bytes)
        members = [
            (_member_info(f"{key}.jpg", len(image_bytes)), image_bytes),
            (_member_info(f"{key}.json", len(json_bytes)), json_bytes),
        ]
        sample_bytes = sum(_member_size(info) for info, _ in members)

        if self._tar is not None and self._shard_count > 0:
            too_many = self._shard_count + 1 > self.max_count
            too_big = _final_archive_size(self._shard_bytes + sample_bytes) > self.max_bytes
            if too_many or too_big:
                self._finish_shard()
        if self._tar is None:
            self._start_shard()

        assert self._tar is not None
        for info, data in members:
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._shard_count += 1
        self._shard_bytes += sample_bytes
        self._count += 1

    def close(self) -> None:
        """Finish the open shard. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._tar is not None:
            self._finish_shard()

    def abort(self) -> None:
        """Drop the shard being written (its temp file), keeping shards already completed."""
        self._closed = True
        tar, tmp = self._tar, self._tmp_path
        self._tar, self._tmp_path = None, None
        if tar is not None:
            try:
                tar.close()
            except OSError:
                pass
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _start_shard(self) -> None:
        final = Path(self.pattern % len(self._shards))
        final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_path = final.with_name(final.name + ".tmp")
        self._tar = tarfile.open(self._tmp_path, "w", format=_FORMAT, encoding=_ENCODING)
        self._shard_count = 0
        self._shard_bytes = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp_path is not None
        self._tar.close()
        final = self._tmp_path.with_name(self._tmp_path.name[: -len(".tmp")])
        os.replace(self._tmp_path, final)
        self._shards.append(final)
        self._tar, self._tmp_path = None, None
