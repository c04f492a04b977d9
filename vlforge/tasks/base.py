"""What every task shares: building loaders from the data node, and evaluation in lockstep across ranks."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from vlforge.config.schema import DataConfig, SplitConfig
from vlforge.core.distributed import DistEnv
from vlforge.datasets.collate import Collator
from vlforge.datasets.loader import ShardLoader
from vlforge.datasets.processors import TextProcessor, build_image_transform
from vlforge.datasets.samples import ImageTextSample
from vlforge.datasets.shards import DataError, RawSample, ShardStream, expand_shard_spec


@dataclass
class EvalResult:
    metrics: dict[str, float]
    # Sample predictions for the tracker: column names and rows (a PIL image or tensor may be a cell).
    table_columns: list[str] = field(default_factory=list)
    table_rows: list[list[Any]] = field(default_factory=list)
    # Every prediction (e.g. {image_id, caption}), saved by the trainer as results/{split}_step_N.json.
    results: list[dict[str, Any]] = field(default_factory=list)


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lockstep(batches: Iterator[dict], device: torch.device) -> Iterator[tuple[dict, bool]]:
    """Yield (batch, is_real) until every rank is out of batches.

    Under ZeRO-3 every forward gathers parameters collectively, so all ranks must run the same number of
    forwards; a rank that runs out repeats its last batch with is_real=False and drops the result.
    """
    last: dict | None = None
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if not _is_distributed():
            if batch is None:
                return
            yield batch, True
            continue
        flags = torch.tensor([batch is not None, batch is not None or last is not None], device=device, dtype=torch.int32)
        any_has = flags.clone()
        dist.all_reduce(any_has, op=dist.ReduceOp.MAX)
        all_started = flags[1:].clone()
        dist.all_reduce(all_started, op=dist.ReduceOp.MIN)
        if not any_has[0]:
            return
        if not all_started[0]:
            raise DataError("an evaluation split has fewer batches than ranks: a rank has no sample to evaluate")
        if batch is not None:
            last = batch
            yield batch, True
        else:
            yield last, False


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just [obj] when not distributed)."""
    if not _is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (for a result only rank 0 computes, such as Java-backed metrics)."""
    if not _is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Task(ABC):
    """Owns which samples a model sees and how it is scored; the trainer calls `train_loader` and
    `evaluate`, a task defines how raw samples become dicts and how a split is scored."""

    text_keys: tuple[str, ...] = ("text",)

    @abstractmethod
    def train_sample(self, data: DataConfig) -> Callable[[RawSample], dict]:
        """The picklable function a loader worker applies to each raw training sample."""

    @abstractmethod
    def eval_sample(self, data: DataConfig) -> Callable[[RawSample], dict]:
        """The same for evaluation samples (no augmentation, every caption or answer kept)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, data: DataConfig, dist_env: DistEnv, seed: int) -> EvalResult:
        """Collective: every rank calls it; every rank returns the same metrics."""

    def collator(self, data: DataConfig) -> Callable[[list[dict]], dict]:
        """What turns a list of samples into a batch, inside the loader workers."""
        return Collator(data.tokenizer, data.max_text_len, self.text_keys, prompts=data.prompts)

    def train_loader(self, data: DataConfig, dist_env: DistEnv, seed: int) -> ShardLoader:
        split = data.train
        stream = ShardStream(
            expand_shard_spec(split.shards),
            self.train_sample(data),
            self.collator(data),
            data.batch_size,
            rank=dist_env.rank,
            world_size=dist_env.world_size,
            split_by=split.split_by,
            shuffle_buffer=split.shuffle_buffer,
            resampled=split.resampled,
            drop_last=True,
            seed=seed,
        )
        return ShardLoader(stream, num_workers=data.num_workers)

    def eval_loader(self, split_name: str, data: DataConfig, dist_env: DistEnv, seed: int) -> ShardLoader:
        split: SplitConfig | None = getattr(data, split_name)
        if split is None:
            raise DataError(f"data.{split_name} is not configured")
        urls = expand_shard_spec(split.shards)
        # Evaluation sees every sample exactly once across ranks, whatever the shard count.
        stream = ShardStream(
            urls,
            self.eval_sample(data),
            self.collator(data),
            data.eval_batch_size,
            rank=dist_env.rank,
            world_size=dist_env.world_size,
            split_by="sample",
            shuffle_shards=False,
            drop_last=False,
            seed=seed,
        )
        return ShardLoader(stream, num_workers=min(data.num_workers, len(urls)), epochs=1)


def image_text_samples(data: DataConfig, train: bool) -> tuple[Callable, Callable]:
    image_cfg = data.train_image if train else data.eval_image
    return build_image_transform(image_cfg), TextProcessor(data.text)


class ImageTextTask(Task):
    """A task whose samples are images with captions: one drawn at random for training, all of them
    (as `captions`) for evaluation."""

    def train_sample(self, data: DataConfig) -> Callable[[RawSample], dict]:
        return ImageTextSample(*image_text_samples(data, train=True), train=True)

    def eval_sample(self, data: DataConfig) -> Callable[[RawSample], dict]:
        return ImageTextSample(*image_text_samples(data, train=False), train=False)
