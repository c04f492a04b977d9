"""Reading WebDataset shards: a deterministic, resumable stream of collated batches.

Per worker the pipeline is: shards -> raw samples (bytes, not decoded) -> rank split (by sample) ->
seeded shuffle buffer -> [skip what a resumed run already consumed] -> decode + process -> batch ->
collate. Everything random is seeded from the configuration and the epoch (per sample: from its shard and key),
so the batch sequence is a function of the configuration alone and a resumed run continues it exactly:
skipping happens before decoding, so fast-forwarding costs reading bytes, not decoding images.

A sample that fails to decode or lacks a field is skipped and reported with its shard and key; a shard
that cannot be read is reported and the stream moves on. Reports ride along with the batches.
"""
from __future__ import annotations

import glob
import hashlib
import random
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import webdataset
from torch.utils.data import IterableDataset, get_worker_info

from vlforge.datasets.tar_files import iter_tar_files

META_KEYS = ("__slot__", "__cursor__", "__events__", "__keys__")


class DataError(RuntimeError):
    """No usable data: every shard failed, or a shard spec matched nothing."""


@dataclass(frozen=True)
class DataEvent:
    kind: str  # "skipped_sample" | "unreadable_shard"
    shard: str
    key: str
    reason: str

    def __str__(self) -> str:
        where = f"shard {self.shard}" + (f", sample '{self.key}'" if self.key else "")
        return f"{self.kind.replace('_', ' ')}: {where}: {self.reason}"


@dataclass
class RawSample:
    key: str
    shard: str
    files: dict[str, bytes]  # extension ("jpg", "json", ...) -> bytes


def expand_shard_spec(spec: str) -> list[str]:
    """'a-{000..009}.tar::/data/b-*.tar' -> shard list. Brace ranges, globs and `pipe:` URLs."""
    urls: list[str] = []
    for url in webdataset.shardlists.expand_urls(spec):
        if not url:  # an empty spec, or an empty part of a '::' list
            continue
        if any(ch in url for ch in "*?[") and not url.startswith("pipe:"):
            matched = sorted(glob.glob(url))
            if not matched:
                raise DataError(f"shard pattern '{url}' matches no file")
            urls.extend(matched)
        else:
            urls.append(url)
    if not urls:
        raise DataError(f"shard spec '{spec}' names no shard")
    return urls


def _seed_cpu(seed: int) -> None:
    """Seed what sample building draws from: Python's and torch's CPU generators. Not torch.manual_seed,
    which on a CUDA build also queues a seeding of every GPU, with a stack trace, per call (about a
    millisecond a sample)."""
    random.seed(seed)
    torch.random.default_generator.manual_seed(seed)


def _stable_seed(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class _ShardTarInfo(tarfile.TarInfo):
    """tarfile ends a stream quietly at a missing or cut-off header; in a shard that is truncation."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):  # type: ignore[no-untyped-def]
        try:
            return super().frombuf(buf, encoding, errors)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError) as err:
            raise tarfile.ReadError(f"truncated: {err} (no end-of-archive marker)") from None


def iter_shard(url: str, events: list[DataEvent]) -> Iterator[RawSample]:
    """Samples of one tar shard, grouped by key (the member name up to the first dot of its basename)."""
    current: RawSample | None = None
    try:
        with webdataset.gopen(url, "rb") as stream:
            for name, read in iter_tar_files(stream, _ShardTarInfo):
                base = name.rsplit("/", 1)[-1]
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                key = name[: len(name) - len(base)] + stem
                if current is not None and current.key != key:
                    yield current
                    current = None
                if current is None:
                    current = RawSample(key=key, shard=url, files={})
                current.files[ext.lower()] = read()
    except (tarfile.TarError, OSError, EOFError) as err:
        # A damaged shard yields the samples before the damage and is reported; the sample being read
        # when it was met may be torn, so it is skipped and named.
        events.append(DataEvent("unreadable_shard", url, "", f"{type(err).__name__}: {err}"))
        if current is not None:
            events.append(DataEvent("skipped_sample", url, current.key, "torn by the damage that ended the shard"))
        return
    if current is not None:
        yield current


@dataclass
class StreamPosition:
    """Where a rank's stream is: per worker slot, how many shuffled samples were consumed."""

    epoch: int = 0
    cursors: dict[int, int] = field(default_factory=dict)
    next_slot: int = 0


class ShardStream(IterableDataset):
    """Batches from shards for one rank. Iterated through torch's DataLoader with batch_size=None."""

    def __init__(
        self,
        urls: Sequence[str],
        build_sample: Callable[[RawSample], dict | None],
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        split_by: str = "shard",
        shuffle_buffer: int = 0,
        shuffle_shards: bool = True,
        resampled: bool = False,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        if split_by not in ("shard", "sample"):
            raise ValueError(f"split_by must be 'shard' or 'sample', got {split_by!r}")
        if split_by == "shard" and not resampled and len(urls) < world_size:
            raise DataError(
                f"{len(urls)} shard(s) cannot be split across {world_size} ranks: write more shards "
                f"or set split_by=sample ({urls[0] + ' ...' if urls else 'no shard given'})"
            )
        self.urls = list(urls)
        self.build_sample, self.collate, self.batch_size = build_sample, collate, batch_size
        self.rank, self.world_size, self.split_by = rank, world_size, split_by
        self.shuffle_buffer, self.shuffle_shards, self.resampled = shuffle_buffer, shuffle_shards, resampled
        self.drop_last, self.seed = drop_last, seed
        self.position = StreamPosition()
        self.slot_offset = 0

    def set_position(self, position: StreamPosition, num_workers: int) -> None:
        self.position = position
        # DataLoader asks worker 0 first; rotating slots makes physical worker 0 play the slot that
        # was next when the position was recorded, so the interleaving continues where it stopped.
        self.slot_offset = position.next_slot % max(1, num_workers)

    def _worker_slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker_id = info.id if info else 0
        return (worker_id + self.slot_offset) % workers, workers

    def _shards_for(self, slot: int, workers: int) -> list[str]:
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(_stable_seed(self.seed, self.position.epoch, "shards")).shuffle(urls)
        if self.split_by == "shard":
            urls = urls[self.rank :: self.world_size]
        return urls[slot::workers]

    def _raw_samples(self, slot: int, workers: int, events: list[DataEvent]) -> Iterator[RawSample]:
        if self.resampled:
            rng = random.Random(_stable_seed(self.seed, self.rank, slot, "resampled"))
            pool = self.urls if self.split_by == "sample" else self.urls[self.rank :: self.world_size] or self.urls
            while True:
                yield from iter_shard(rng.choice(pool), events)
        index = 0
        for url in self._shards_for(slot, workers):
            for sample in iter_shard(url, events):
                if self.split_by == "sample":
                    index += 1
                    if (index - 1) % self.world_size != self.rank:
                        continue
                yield sample

    def _shuffled(self, samples: Iterator[RawSample], slot: int) -> Iterator[RawSample]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        rng = random.Random(_stable_seed(self.seed, self.position.epoch, self.rank, slot, "buffer"))
        buffer: list[RawSample] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            pick = rng.randrange(len(buffer))
            buffer[pick], sample = sample, buffer[pick]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _build(self, raw: RawSample) -> dict | None:
        # Seeded by what the sample is, not where it is: the same augmentation and caption choice on
        # any rank, worker or world size, and after a resume.
        seed = _stable_seed(self.seed, self.position.epoch, raw.shard.rsplit("/", 1)[-1], raw.key)
        if get_worker_info() is None:
            # In the main process, keep the trainer's own RNG streams untouched.
            py_state = random.getstate()
            with torch.random.fork_rng(devices=[]):
                _seed_cpu(seed)
                sample = self.build_sample(raw)
            random.setstate(py_state)
            return sample
        _seed_cpu(seed)
        return self.build_sample(raw)

    def __iter__(self) -> Iterator[dict]:
        slot, workers = self._worker_slot()
        events: list[DataEvent] = []
        start = self.position.cursors.get(slot, 0)
        cursor = 0
        pending: list[dict] = []
        keys: list[str] = []

        def emit() -> dict:
            batch = self.collate(pending)
            batch.update({"__slot__": slot, "__cursor__": cursor, "__events__": list(events), "__keys__": list(keys)})
            events.clear()
            pending.clear()
            keys.clear()
            return batch

        for raw in self._shuffled(self._raw_samples(slot, workers, events), slot):
            cursor += 1
            if cursor <= start:
                continue
            try:
                sample = self._build(raw)
            except Exception as err:  # noqa: BLE001 - any bad sample is skipped and reported
                events.append(DataEvent("skipped_sample", raw.shard, raw.key, f"{type(err).__name__}: {err}"))
                continue
            if sample is None:
                continue
            pending.append(sample)
            keys.append(raw.key)
            if len(pending) == self.batch_size:
                yield emit()
        if pending and not self.drop_last:
            yield emit()
        if events:
            yield {"__slot__": slot, "__cursor__": cursor, "__events__": list(events), "__keys__": []}
        # The epoch is played out: asked for more (the next pass of the DataLoader, in a persistent
        # worker or in the main process), the stream plays the next one, as ShardLoader counts it.
        self.position, self.slot_offset = StreamPosition(epoch=self.position.epoch + 1), 0
