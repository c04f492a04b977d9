"""What every task shares: building loaders from the data node, and evaluation in lockstep across ranks."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from vlforge.config.schema import DataConfig, SplitConfig
from vlforge.core.distributed import DistEnv
from vlforge.datasets.collate import Collator
from vlforge.datasets.loader import ShardLoader
from vlforge.datasets.processors import TextProcessor, build_image_transform
from vlforge.datasets.samples import ImageTextSample
from vlforge.datasets.shards import DataError, RawSample, ShardStream, expand_shard_spec
from vlforge.tasks.evaluation import (
    EvalResult,
    EvalStep,
    broadcast_object,
    gather_objects,
    lockstep,
    merge_records,
    model_device,
    own_storage,
    to_device,
)


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

    # The report table's columns (`summarize` fills its rows), and how many rows a rank reports.
    table_columns: tuple[str, ...] = ()
    report_images: int = 16
    # A summary that calls the model collectively (ITM re-ranking) runs on every rank; otherwise rank 0
    # summarizes (Java-backed caption metrics, say) and broadcasts the metrics.
    summarize_on_every_rank: bool = False

    def eval_state(self, model: nn.Module, data: DataConfig, split: str) -> Any:
        """What a split's evaluation computes once before its batches (checks the model's capabilities,
        loads a tokenizer); handed to every `eval_step` and to `summarize`."""
        return None

    @abstractmethod
    def eval_step(self, model: nn.Module, batch: dict, state: Any, report_rows: int) -> EvalStep:
        """One batch (on the model's device): its records, and at most `report_rows` report rows."""

    @abstractmethod
    def summarize(self, records: dict[str, list[Any]], table: list[list[Any]], state: Any) -> EvalResult:
        """The split's result from every rank's records (`merge_records`) and this rank's report rows."""

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, data: DataConfig, dist_env: DistEnv, seed: int) -> EvalResult:
        """Collective: every rank calls it; every rank returns the same metrics (the results file and
        the table come from rank 0, or from every rank when `summarize_on_every_rank`)."""
        state = self.eval_state(model, data, split)
        device = model_device(model)
        records: dict[str, list[Any]] = {}
        table: list[list[Any]] = []
        batches = tqdm(lockstep(iter(self.eval_loader(split, data, dist_env, seed)), device), desc=f"eval {split}",
                       unit="batch", leave=False, dynamic_ncols=True, disable=not dist_env.is_main)
        for batch, real in batches:
            step = self.eval_step(model, to_device(batch, device), state, self.report_images - len(table))
            if not real:  # a rank out of batches repeats its last one so that ZeRO-3's gathers line up
                continue
            for key, values in step.records.items():
                records.setdefault(key, []).extend(own_storage(values))
            table.extend(step.table[: self.report_images - len(table)])
        merged = merge_records(gather_objects(records))
        if self.summarize_on_every_rank:
            return self.summarize(merged, table, state)
        result = self.summarize(merged, table, state) if dist_env.is_main else None
        metrics = broadcast_object(result.metrics if result is not None else None)
        return result if result is not None else EvalResult(metrics=metrics)

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
        return ShardLoader(stream, num_workers=data.num_workers, max_bad_fraction=data.max_bad_fraction)

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
