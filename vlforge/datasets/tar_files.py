"""The regular files of a tar stream, in order, as (name, bytes).

tarfile parses each 512-byte header in Python field by field, which costs more than decoding a small
image. Shards are plain ustar archives (what ShardWriter, webdataset and img2dataset write): their
headers are read here directly. Anything else (a compressed stream, pax or GNU long-name headers,
links, a header that does not check out, a stream that ends early) is handed to tarfile from that
header on, which reads and reports it as it would have read the whole stream, with one difference: a
damaged header after the first is, for tarfile, the first header of a stream, which it refuses with
an error; reading the whole stream it would have ended there quietly, the files after it unreported.
"""
from __future__ import annotations

import tarfile
from typing import BinaryIO, Callable, Iterator

BLOCK = tarfile.BLOCKSIZE
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def _field(raw: bytes, encoding: str = "ascii", errors: str = "strict") -> str:
    """A NUL-terminated header field as text (tarfile's nts)."""
    end = raw.find(0)
    return (raw if end == -1 else raw[:end]).decode(encoding, errors)


def _plain_header(header: bytes) -> tuple[str, int, bool] | None:
    """(name, size, is a regular file) of a ustar header of a regular file or a directory whose
    checksum holds; None for every other header, which tarfile reads instead."""
    kind = header[156:157]
    if kind not in _FILE_TYPES and kind != tarfile.DIRTYPE or header[257:262] != b"ustar" or header[124] & 0x80:
        return None
    try:  # octal numbers as tarfile's nti reads them
        size = int(_field(header[124:136]).strip() or "0", 8)
        checksum = int(_field(header[148:156]).strip() or "0", 8)
    except (ValueError, UnicodeDecodeError):
        return None
    # The unsigned sum with the checksum field counted as eight spaces (tarfile also accepts a signed
    # sum, which old tars wrote: such a header goes to tarfile).
    if size < 0 or checksum != sum(header) - sum(header[148:156]) + 8 * ord(" "):
        return None
    name = _field(header[:100], tarfile.ENCODING, "surrogateescape")
    prefix = _field(header[345:500], tarfile.ENCODING, "surrogateescape")
    is_dir = kind == tarfile.DIRTYPE or (kind == tarfile.AREGTYPE and name.endswith("/"))
    if is_dir:
        name = name.rstrip("/")
    return (f"{prefix}/{name}" if prefix else name), size, not is_dir


def _read_exactly(read, size: int) -> bytes:  # noqa: ANN001 - a stream's read
    """`size` bytes, fewer only at the end of the stream (a pipe may give less per read)."""
    data = read(size)
    while 0 < len(data) < size:
        more = read(size - len(data))
        if not more:
            break
        data += more
    return data


class _Prepended:
    """A stream that gives `head` and then the rest of `stream` (to tarfile, which reads sizes it
    chooses and takes a short read as the stream's way)."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int) -> bytes:
        if not self.head:
            return self.stream.read(size)
        data, self.head = self.head[:size], self.head[size:]
        return data


def _tarfile_files(stream: BinaryIO, tarinfo: type[tarfile.TarInfo]) -> Iterator[tuple[str, Callable[[], bytes]]]:
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=tarinfo) as tar:
        for member in tar:
            if member.isfile():
                yield member.name, lambda member=member: _extracted(tar, member)


def _extracted(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    data = tar.extractfile(member)
    return data.read() if data is not None else b""


class _FileData:
    """The data of the file whose header was just read, read once, when first asked for."""

    def __init__(self, read: Callable[[int], bytes], size: int) -> None:
        self.stream_read, self.size, self.data = read, size, None

    def read(self) -> bytes:
        if self.data is None:
            data = _read_exactly(self.stream_read, self.size)
            if len(data) < self.size:
                raise tarfile.ReadError("unexpected end of data")  # tarfile's words for it
            # Padding cut short is not an error here (tarfile skips it the same way): the next
            # header's read finds the stream's end.
            _read_exactly(self.stream_read, -self.size % BLOCK)
            self.data = data
        return self.data


def iter_tar_files(stream: BinaryIO, tarinfo: type[tarfile.TarInfo] = tarfile.TarInfo,
                   ) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name, read) of each regular file of the tar `stream`, in order, `read()` giving its data, as
    `tarfile.open(fileobj=stream, mode="r|*", tarinfo=tarinfo)` gives them and raising what it raises.
    A file's name comes as soon as its header is read, its data when `read` is called (it is skipped
    otherwise)."""
    read = stream.read
    while True:
        header = _read_exactly(read, BLOCK)
        if len(header) == BLOCK and header.count(0) == BLOCK:  # end of archive
            return
        plain = _plain_header(header) if len(header) == BLOCK else None
        if plain is None:
            yield from _tarfile_files(_Prepended(header, stream), tarinfo)
            return
        name, size, is_file = plain
        data = _FileData(read, size)
        if is_file:
            yield name, data.read
        data.read()  # read whether or not it was asked for: the next header follows it
