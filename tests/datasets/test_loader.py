"""ShardStream + ShardLoader: determinism, exact resume, rank splits, bad-data reports, per-sample seeding."""
import json
import os
import random
from collections import Counter

import pytest
import torch
from braceexpand import braceexpand

from vlforge.config.data import DemoConfig, ImageTransformConfig
from vlforge.datasets.collate import Collator
from vlforge.datasets.demo import build_demo_dataset
from vlforge.datasets.loader import ShardLoader
from vlforge.datasets.processors import TextProcessor, build_image_transform
from vlforge.datasets.samples import ImageTextSample
from vlforge.datasets.shards import DataError, ShardStream, StreamPosition

NUM_TRAIN = 96  # 6 shards of 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        paths = build_demo_dataset(
            DemoConfig(
                root=str(tmp_path_factory.mktemp("demo") / "demo"),
                num_train=NUM_TRAIN, num_val=16, num_test=16, samples_per_shard=16,
            )
        )
        Collator(paths.tokenizer, max_len=16)  # loads (and caches) the tokenizer offline
        yield paths


@pytest.fixture(scope="module")
def urls(demo):
    found = list(braceexpand(demo.train))
    assert len(found) == 6
    return found


def _stream(urls, demo, *, batch_size=8, train=True, **kwargs) -> ShardStream:
    sample = ImageTextSample(build_image_transform(ImageTransformConfig(size=32, train=train)), TextProcessor(), train)
    return ShardStream(list(urls), sample, Collator(demo.tokenizer, max_len=16), batch_size, **kwargs)


def _take(loader: ShardLoader, n: int | None = None) -> list[tuple[list[str], dict]]:
    """(keys, batch) pairs: the first n batches of the loader's iterator, or all of them."""
    out = []
    for batch in loader:
        out.append((list(loader.last_keys), batch))
        if n is not None and len(out) == n:
            break
    return out


def _assert_same_batches(got, expected):
    assert [keys for keys, _ in got] == [keys for keys, _ in expected]
    for (_, a), (_, b) in zip(got, expected):
        assert a.keys() == b.keys()
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["text_input_ids"], b["text_input_ids"])
        assert torch.equal(a["text_attention_mask"], b["text_attention_mask"])
        assert a["image_id"] == b["image_id"]


def _all_keys(batches) -> list[str]:
    return [key for keys, _ in batches for key in keys]


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_config_gives_identical_batches(demo, urls, num_workers):
    def run():
        stream = _stream(urls, demo, shuffle_buffer=20, seed=7)
        return _take(ShardLoader(stream, num_workers=num_workers), 14)  # 12 batches per epoch: crosses into epoch 1

    first, second = run(), run()
    _assert_same_batches(first, second)
    for keys, batch in first:
        assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.uint8
        assert batch["image_id"] == keys  # demo image_id is the sample key
    epoch0 = _all_keys(first[:12])
    assert sorted(epoch0) == [f"train_{i:06d}" for i in range(NUM_TRAIN)]  # one epoch = every sample once
    assert epoch0 != sorted(epoch0)  # the shuffle is real, so the equality above is not trivial
    assert _all_keys(first[12:]) != epoch0[:16]  # and the next epoch is ordered differently


def _shard_of(key: str) -> int:
    return int(key[-6:]) // 16  # the demo writes train_000000..000095 in order, 16 per shard


def test_shard_order_follows_seed_and_epoch(demo, urls):
    def shard_order(seed, epochs=1):
        keys = _all_keys(_take(ShardLoader(_stream(urls, demo, seed=seed, drop_last=False), num_workers=0, epochs=epochs)))
        return [_shard_of(k) for k in keys[::16]]

    assert sorted(shard_order(1)) == list(range(6))
    assert shard_order(1) != shard_order(2)
    both = shard_order(1, epochs=2)
    assert both[:6] == shard_order(1) and sorted(both[6:]) == list(range(6)) and both[6:] != both[:6]


def test_a_buffer_of_two_already_shuffles_and_reshuffles_each_epoch(demo, urls):
    plain = _all_keys(_take(ShardLoader(_stream(urls[:1], demo, shuffle_shards=False), num_workers=0), 2))
    two = _take(ShardLoader(_stream(urls[:1], demo, shuffle_shards=False, shuffle_buffer=2), num_workers=0), 4)
    assert sorted(_all_keys(two[:2])) == sorted(plain) and _all_keys(two[:2]) != plain
    assert _all_keys(two[2:]) != _all_keys(two[:2])


def test_resampled_shards_draw_forever_from_the_rank_s_own_shards(demo, urls):
    def shards_drawn(rank, world_size, urls=urls, seed=0, split_by="shard"):
        stream = _stream(urls, demo, rank=rank, world_size=world_size, resampled=True, seed=seed, split_by=split_by)
        keys = _all_keys(_take(ShardLoader(stream, num_workers=0), 30))  # 240 samples: 2.5 passes over 96
        assert len(keys) == 240
        return [_shard_of(k) for k in keys[::16]]

    drawn = shards_drawn(0, 2)
    assert set(drawn) <= {0, 2, 4} and len(set(drawn)) > 1  # with replacement, from its own shards
    assert set(shards_drawn(1, 2)) <= {1, 3, 5}
    assert shards_drawn(0, 2) == drawn and shards_drawn(0, 2, seed=1) != drawn
    # A rank left without a shard of its own draws from all of them; split by sample, every rank does.
    assert len(set(shards_drawn(3, 4, urls=urls[:3]))) > 1
    by_sample = shards_drawn(0, 2, split_by="sample")
    assert not set(by_sample) <= {0, 2, 4} and shards_drawn(1, 2, split_by="sample") != by_sample


def test_seed_changes_order(demo, urls):
    a = _take(ShardLoader(_stream(urls, demo, shuffle_buffer=20, seed=1), num_workers=0), 3)
    b = _take(ShardLoader(_stream(urls, demo, shuffle_buffer=20, seed=2), num_workers=0), 3)
    assert _all_keys(a) != _all_keys(b)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_leaves_the_callers_rng_untouched(demo, urls, num_workers):
    # The trainer seeds torch/python RNGs for dropout etc. and checkpoints them; the loader must not draw from
    # them (or a resumed run, which starts a new epoch iterator mid-way, would see different random numbers).
    loader = ShardLoader(_stream(urls[:2], demo, shuffle_buffer=4), num_workers=num_workers)
    torch.manual_seed(123)
    random.seed(123)
    _take(loader, 6)  # 4 batches per epoch: two epoch iterators are started
    torch_next, py_next = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    assert torch.equal(torch_next, torch.rand(3))
    assert py_next == random.random()


def test_train_augmentation_is_fresh_each_epoch(demo, urls):
    # One shard, no shuffle: the same 16 samples in the same order each epoch, 2 batches per epoch.
    batches = _take(ShardLoader(_stream(urls[:1], demo, shuffle_shards=False), num_workers=0), 4)
    assert batches[0][0] + batches[1][0] == batches[2][0] + batches[3][0]
    epoch0 = torch.cat([batches[0][1]["image"], batches[1][1]["image"]])
    epoch1 = torch.cat([batches[2][1]["image"], batches[3][1]["image"]])
    differing = sum(not torch.equal(x, y) for x, y in zip(epoch0, epoch1))
    assert differing >= 12  # new random crops each epoch (a rare identical crop is allowed)


class _WorkerPid:
    """A collate that stamps each batch with the process that made it."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        return {**self.collate(samples), "worker_pid": os.getpid()}


def test_workers_live_from_epoch_to_epoch(demo, urls):
    # One shard per worker, 2 batches each: 4 batches an epoch, so 12 batches are 3 epochs. Starting
    # workers anew each epoch would fork the trainer and leave the pipeline empty at every epoch's start.
    stream = _stream(urls[:2], demo, shuffle_buffer=4)
    stream.collate = _WorkerPid(stream.collate)
    loader = ShardLoader(stream, num_workers=2)
    batches = _take(loader, 12)
    pids = [batch["worker_pid"] for _, batch in batches]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert pids[:4] == pids[4:8] == pids[8:]  # the same two processes, in the same turns, every epoch
    assert loader.position.epoch == 2
    for epoch in range(3):  # and each epoch is every sample once
        assert sorted(_all_keys(batches[4 * epoch : 4 * epoch + 4])) == [f"train_{i:06d}" for i in range(32)]
    # One worker (the small-model setting) lives on too.
    single = _stream(urls[:1], demo, shuffle_buffer=4)
    single.collate = _WorkerPid(single.collate)
    pids = {batch["worker_pid"] for _, batch in _take(ShardLoader(single, num_workers=1), 6)}  # 3 epochs
    assert len(pids) == 1 and os.getpid() not in pids


# ---------------------------------------------------------------- exact resume

RESUME_AT = [3, 9, 13]  # 5 shards, batch 8 -> 10 batches per epoch: mid-epoch, worker tail, after the epoch boundary
RESUME_NEXT = 10


def _resume_stream(urls, demo):
    return _stream(urls[:5], demo, shuffle_buffer=10, seed=3, drop_last=True)


@pytest.fixture(scope="module")
def uninterrupted(demo, urls):
    cache = {}

    def get(num_workers):
        if num_workers not in cache:
            loader = ShardLoader(_resume_stream(urls, demo), num_workers=num_workers)
            cache[num_workers] = _take(loader, max(RESUME_AT) + RESUME_NEXT)
        return cache[num_workers]

    return get


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("k", RESUME_AT)
def test_resume_continues_exactly(demo, urls, uninterrupted, num_workers, k):
    reference = uninterrupted(num_workers)
    # Sanity: 10 batches of the 80 samples per epoch, so k=13 really crossed an epoch boundary.
    assert sorted(_all_keys(reference[:10])) == sorted(_all_keys(reference[10:20]))
    assert len(set(_all_keys(reference[:10]))) == 80

    first = ShardLoader(_resume_stream(urls, demo), num_workers=num_workers)
    _assert_same_batches(_take(first, k), reference[:k])
    state = json.loads(json.dumps(first.state_dict()))  # survives a plain-JSON checkpoint
    assert state["position"]["epoch"] == k // 10

    resumed = ShardLoader(_resume_stream(urls, demo), num_workers=num_workers)
    resumed.load_state_dict(state)
    _assert_same_batches(_take(resumed, RESUME_NEXT), reference[k : k + RESUME_NEXT])


def test_resume_with_other_worker_count_starts_next_epoch(demo, urls, caplog):
    first = ShardLoader(_resume_stream(urls, demo), num_workers=2)
    _take(first, 3)
    resumed = ShardLoader(_resume_stream(urls, demo), num_workers=0)
    with caplog.at_level("WARNING", logger="vlforge"):
        resumed.load_state_dict(first.state_dict())
    assert ("data: checkpoint was taken with 2 loader workers, now 0: restarting the epoch order from epoch 1 "
            "instead of continuing mid-epoch") in caplog.messages
    fresh = ShardLoader(_resume_stream(urls, demo), num_workers=0)
    # Epoch 1 of a fresh single-process loader starts at its 11th batch.
    _assert_same_batches(_take(resumed, 2), _take(fresh, 12)[10:12])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_continue_epoch_skips_this_rank_s_share_of_what_other_ranks_read(demo, urls, num_workers):
    # A run on 3 ranks read 24 samples of epoch 1; this rank of the new run skips its share of them:
    # 24 // 3, split evenly over its worker slots.
    resumed = ShardLoader(_resume_stream(urls, demo), num_workers=num_workers)
    resumed.continue_epoch(1, samples_read=24, world_size=3)
    slots = max(1, num_workers)
    assert resumed.position == StreamPosition(1, {slot: 8 // slots for slot in range(slots)}, 0)
    resumed.continue_epoch(1, samples_read=25, world_size=3)  # 8 each, the remainder is read again
    assert resumed.position.cursors == {slot: 8 // slots for slot in range(slots)}
    resumed.continue_epoch(1, samples_read=25, world_size=1)
    assert resumed.position.cursors == {slot: 25 // slots for slot in range(slots)}
    resumed.continue_epoch(1, samples_read=24, world_size=3)
    if num_workers == 0:  # one stream: epoch 1 from its 9th sample on
        fresh = ShardLoader(_resume_stream(urls, demo), num_workers=0)
        assert _all_keys(_take(resumed, 9)) == _all_keys(_take(fresh, 20)[10:20])[8:]


# ---------------------------------------------------------------- rank splits


def test_split_by_shard_partitions_one_epoch_across_ranks(demo, urls):
    per_rank = []
    for rank in (0, 1):
        stream = _stream(urls, demo, rank=rank, world_size=2, split_by="shard", drop_last=False, seed=5)
        per_rank.append(_all_keys(_take(ShardLoader(stream, num_workers=0, epochs=1))))
    a, b = per_rank
    assert len(a) == len(b) == NUM_TRAIN // 2  # 3 whole shards each
    assert not set(a) & set(b)
    assert sorted(a + b) == [f"train_{i:06d}" for i in range(NUM_TRAIN)]


def test_split_by_shard_needs_a_shard_per_rank(demo, urls):
    with pytest.raises(DataError) as info:
        _stream(urls[:1], demo, rank=0, world_size=2, split_by="shard")
    assert str(info.value) == ("1 shard(s) cannot be split across 2 ranks: write more shards or set split_by=sample "
                               f"({urls[0]} ...)")
    with pytest.raises(DataError) as info:
        _stream([], demo, rank=0, world_size=1, split_by="shard")
    assert str(info.value).endswith("(no shard given)")
    with pytest.raises(ValueError) as info:
        _stream(urls, demo, split_by="row")
    assert str(info.value) == "split_by must be 'shard' or 'sample', got 'row'"
    _stream(urls[:1], demo, rank=1, world_size=2, split_by="sample")  # splitting samples is fine


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (2, 2), (3, 2)])
def test_split_by_sample_covers_every_sample_once(demo, urls, world_size, num_workers):
    keys = []
    for rank in range(world_size):
        stream = _stream(urls, demo, rank=rank, world_size=world_size, split_by="sample", drop_last=False, seed=5)
        rank_keys = _all_keys(_take(ShardLoader(stream, num_workers=num_workers, epochs=1)))
        assert abs(len(rank_keys) - NUM_TRAIN / world_size) < 2  # balanced
        keys += rank_keys
    assert sorted(keys) == [f"train_{i:06d}" for i in range(NUM_TRAIN)]
    assert max(Counter(keys).values()) == 1


def test_augmentation_is_seeded_by_sample_not_by_rank_or_worker(demo, urls):
    def per_key(stream, num_workers):
        out = {}
        for keys, batch in _take(ShardLoader(stream, num_workers=num_workers, epochs=1)):
            for i, key in enumerate(keys):
                out[key] = (batch["image"][i], batch["text_input_ids"][i][batch["text_attention_mask"][i].bool()])
        return out

    alone = per_key(_stream(urls, demo, rank=0, world_size=1, split_by="sample", drop_last=False, seed=9), 0)
    shared = per_key(
        _stream(urls, demo, rank=1, world_size=2, split_by="sample", drop_last=False, seed=9, shuffle_buffer=8), 2
    )
    assert len(alone) == NUM_TRAIN and len(shared) == NUM_TRAIN // 2
    for key, (image, text) in shared.items():
        assert torch.equal(image, alone[key][0]), key
        assert torch.equal(text, alone[key][1]), key
