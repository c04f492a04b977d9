"""The shard reader fuzzed: a valid shard with bytes flipped anywhere, bytes flipped inside its samples'
files only, cut short at any byte, or empty (1,001 cases, derandomized). It never crashes (a DataError
naming the shard when nothing at all is usable), every event names the shard and every skipped sample
its key, and no sample is dropped silently: each one the damage left whole arrives, or, after damage
that ends the shard, is named as skipped."""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlforge.config.data import ImageTransformConfig
from vlforge.datasets.loader import ShardLoader
from vlforge.datasets.processors import TextProcessor, build_image_transform
from vlforge.datasets.samples import ImageTextSample
from vlforge.datasets.shards import DataError, ShardStream
from vlforge.datasets.writer import ShardWriter

SAMPLES = 6
CASES: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()


def _jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 24), ((40 * i) % 256, (90 * i) % 256, 200)).save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, list[tuple[int, int]]]]:
    """The shard's bytes, and per sample key the (start, end) byte ranges of its files' data."""
    root = tmp_path_factory.mktemp("fuzz")
    with ShardWriter(str(root / "clean-%03d.tar"), max_count=SAMPLES) as writer:
        for i in range(SAMPLES):
            writer.write(f"f{i:02d}", _jpeg(i), {"image_id": f"f{i:02d}", "captions": [f"a square number {i}"]})
    data = Path(writer.shards[0]).read_bytes()
    spans: dict[str, list[tuple[int, int]]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            spans.setdefault(member.name.partition(".")[0], []).append((member.offset, member.offset_data + member.size))
    assert sorted(spans) == [f"f{i:02d}" for i in range(SAMPLES)]
    return data, spans


def _read(path: Path) -> tuple[list[str], ShardLoader, DataError | None]:
    sample = ImageTextSample(build_image_transform(ImageTransformConfig(size=16, train=False)), TextProcessor(), False)
    stream = ShardStream([str(path)], sample, lambda rows: {"image": torch.stack([r["image"] for r in rows])}, 2,
                         drop_last=False, shuffle_shards=False)
    loader = ShardLoader(stream, num_workers=0, epochs=1)
    keys: list[str] = []
    try:
        for _ in loader:
            keys += loader.last_keys
    except DataError as err:  # nothing usable at all: the one error the reader may raise
        assert str(path) in str(err)
        return keys, loader, err
    return keys, loader, None


def _check_events(path: Path, loader: ShardLoader, keys: list[str]) -> set[str]:
    report = loader.report
    assert all(event.shard == str(path) for event in report.skipped_samples + report.unreadable_shards)
    assert all(event.key for event in report.skipped_samples)
    skipped = {event.key for event in report.skipped_samples}
    assert len(keys) == len(set(keys)) and not skipped & set(keys)  # nothing both used and skipped, nor twice
    OUTCOMES["unreadable shard"] += bool(report.unreadable_shards)
    OUTCOMES["skipped samples"] += len(report.skipped_samples)
    return skipped


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "damaged.tar"
    path.write_bytes(data)
    return path


# Integers, not floats, for positions: the suite flushes denormals, which hypothesis' float strategies
# refuse to run under.
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=400, **SETTINGS)
@given(flips=st.lists(st.tuples(st.integers(0, 2**31 - 1), st.integers(0, 7)), min_size=1, max_size=8))
def test_bytes_flipped_anywhere_never_crash_the_reader(clean, tmp_path, flips):
    data, _ = clean
    damaged = bytearray(data)
    for where, bit in flips:
        damaged[where % len(data)] ^= 1 << bit
    path = _write(tmp_path, bytes(damaged))
    keys, loader, _ = _read(path)
    _check_events(path, loader, keys)
    CASES["flipped anywhere"] += 1


@settings(max_examples=300, **SETTINGS)
@given(picks=st.lists(st.tuples(st.integers(0, SAMPLES - 1), st.integers(0, 2**31 - 1), st.integers(0, 7)),
                      min_size=1, max_size=6))
def test_bytes_flipped_inside_samples_lose_no_sample_silently(clean, tmp_path, picks):
    data, spans = clean
    damaged = bytearray(data)
    touched = set()
    for index, where, bit in picks:
        key = f"f{index:02d}"
        # Inside a file's data, not its tar header: the archive stays readable.
        start, end = max(spans[key], key=lambda span: span[1] - span[0])
        data_start = end - (end - start - 512)
        damaged[data_start + where % (end - data_start)] ^= 1 << bit
        touched.add(key)
    path = _write(tmp_path, bytes(damaged))
    keys, loader, _ = _read(path)
    skipped = _check_events(path, loader, keys)
    assert not loader.report.unreadable_shards
    assert set(keys) | skipped == set(spans), "a sample neither arrived nor was reported"
    assert set(spans) - touched <= set(keys)  # every untouched sample arrives
    CASES["flipped inside samples"] += 1


@settings(max_examples=300, **SETTINGS)
@given(where=st.integers(0, 2**31 - 1))
def test_a_shard_cut_short_anywhere_names_what_it_lost(clean, tmp_path, where):
    data, spans = clean
    cut = where % len(data)
    path = _write(tmp_path, data[:cut])
    keys, loader, error = _read(path)
    skipped = _check_events(path, loader, keys)
    # A cut inside the end-of-archive padding loses nothing; any other is reported.
    assert loader.report.unreadable_shards or set(keys) == set(spans), "a cut that lost samples must be reported"
    assert set(keys) | skipped <= set(spans)
    whole = {key for key, ranges in spans.items() if max(end for _, end in ranges) <= cut}
    # Every sample the cut left whole arrived, or (the last one, whose end the reader cannot confirm)
    # is named as skipped: none is dropped without a word.
    assert whole <= set(keys) | skipped
    assert len(whole - set(keys)) <= 1
    CASES["cut short"] += 1


def test_an_empty_shard_is_reported_and_nothing_else_happens(tmp_path):
    path = _write(tmp_path, b"")
    keys, loader, error = _read(path)
    assert keys == [] and error is not None and "1 unreadable shard(s)" in str(error)
    CASES["empty"] += 1


def test_zz_the_fuzz_ran_every_case():
    # Runs last in this file: the counts the docs quote (printed with -s).
    print(f"\nshard fuzz: {sum(CASES.values())} cases {dict(CASES)}; outcomes {dict(OUTCOMES)}")
    if len(CASES) == 4:
        assert sum(CASES.values()) >= 1001
