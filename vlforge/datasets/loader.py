"""The trainer's view of a ShardStream: endless epochs of batches, a state to checkpoint, a data report."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from vlforge.datasets.shards import DataError, DataEvent, ShardStream, StreamPosition

log = logging.getLogger(__name__)

# Fewer samples than this give too rough a fraction to stop a run on (unless the epoch has ended).
MIN_SAMPLES_FOR_BAD_FRACTION = 100


@dataclass
class DataReport:
    """What the loader could not use, kept for the run summary and the metrics log."""

    skipped_samples: list[DataEvent] = field(default_factory=list)
    unreadable_shards: list[DataEvent] = field(default_factory=list)
    skips_read: int = 0  # skipped samples as read, each epoch again (the lists above hold each once)

    def add(self, events: list[DataEvent]) -> None:
        for event in events:
            self.skips_read += event.kind == "skipped_sample"
            target = self.skipped_samples if event.kind == "skipped_sample" else self.unreadable_shards
            if event not in target:
                target.append(event)
                log.warning("data: %s", event)

    def summary(self) -> str:
        lines = [f"{len(self.skipped_samples)} skipped sample(s), {len(self.unreadable_shards)} unreadable shard(s)"]
        lines += [f"  {event}" for event in self.unreadable_shards + self.skipped_samples]
        return "\n".join(lines)


def _strip_meta(batch: dict) -> tuple[dict, int, int, list, list]:
    slot = batch.pop("__slot__")
    cursor = batch.pop("__cursor__")
    events = batch.pop("__events__")
    keys = batch.pop("__keys__")
    return batch, slot, cursor, events, keys


class ShardLoader:
    """Iterates a stream epoch after epoch (forever for training, once for evaluation).

    `state_dict()` after a batch has been taken is exactly what `load_state_dict` needs to continue
    with the next batch, provided the number of workers is the same.
    """

    def __init__(self, stream: ShardStream, num_workers: int = 2, epochs: int | None = None,
                 max_bad_fraction: float = 1.0) -> None:
        self.stream, self.num_workers, self.epochs = stream, num_workers, epochs
        self.max_bad_fraction = max_bad_fraction
        self.position = StreamPosition()
        self.report = DataReport()
        self.last_keys: list[str] = []
        self.samples_used = 0

    def _check_bad_fraction(self, end_of_epoch: bool) -> None:
        """Stop with the report once too many of the samples read could not be used."""
        bad = self.report.skips_read
        read = self.samples_used + bad
        if read == 0 or (read < MIN_SAMPLES_FOR_BAD_FRACTION and not end_of_epoch):
            return
        if bad / read > self.max_bad_fraction:
            raise DataError(
                f"rank {self.stream.rank}: {bad} of the {read} samples read ({bad / read:.1%}) could not be used, "
                f"more than data.max_bad_fraction={self.max_bad_fraction}: stopping rather than training on what "
                f"is left. {self.report.summary()}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"position": asdict(self.position), "num_workers": self.num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_workers"] != self.num_workers:
            log.warning(
                "data: checkpoint was taken with %d loader workers, now %d: restarting the epoch order "
                "from epoch %d instead of continuing mid-epoch", state["num_workers"], self.num_workers,
                state["position"]["epoch"] + 1,
            )
            self.position = StreamPosition(epoch=state["position"]["epoch"] + 1)
            return
        pos = state["position"]
        self.position = StreamPosition(pos["epoch"], {int(k): v for k, v in pos["cursors"].items()}, pos["next_slot"])

    def continue_epoch(self, epoch: int, samples_read: int, world_size: int) -> None:
        """Go on with `epoch`, of which `samples_read` samples were read over every rank and worker of a
        run with another number of ranks: each worker slot of this rank skips its even share of them.
        The count of samples is kept, not which ones: shards are split over the ranks anew."""
        share = samples_read // max(1, world_size * max(1, self.num_workers))
        self.position = StreamPosition(epoch, {slot: share for slot in range(max(1, self.num_workers))}, 0)

    def _loader(self) -> DataLoader:
        self.stream.set_position(self.position, self.num_workers)
        return DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            # The workers live from epoch to epoch: each plays its stream's next epoch itself
            # (`ShardStream.__iter__`), so an epoch's end costs no new processes (a fork of the
            # trainer, the tokenizer loaded again) and no empty pipeline while they start.
            persistent_workers=self.num_workers > 0,
            # Its own generator: DataLoader draws a worker base seed per epoch, which would otherwise come
            # from the trainer's global torch RNG (and shift it differently in a resumed run).
            generator=torch.Generator(),
        )

    def __iter__(self) -> Iterator[dict]:
        epochs_done = 0
        loader = self._loader()  # each pass over it plays the stream's next epoch (ShardStream.__iter__)
        while self.epochs is None or epochs_done < self.epochs:
            batches = 0
            started_mid_epoch = bool(self.position.cursors)
            for batch in loader:
                batch, slot, cursor, events, keys = _strip_meta(batch)
                self.report.add(events)
                self.position.cursors[slot] = cursor
                self.position.next_slot = (slot + 1) % max(1, self.num_workers)
                if not batch:
                    continue
                batches += 1
                self.last_keys = keys
                self.samples_used += len(keys)
                self._check_bad_fraction(end_of_epoch=False)
                yield batch
            if batches == 0 and not started_mid_epoch:
                raise DataError(
                    f"no batch could be made from {len(self.stream.urls)} shard(s) on rank {self.stream.rank} "
                    f"in epoch {self.position.epoch}: {self.report.summary()}"
                )
            self._check_bad_fraction(end_of_epoch=True)
            epochs_done += 1
            self.position = StreamPosition(epoch=self.position.epoch + 1)
