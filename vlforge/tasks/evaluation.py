"""The one evaluation scaffold: batches in lockstep over ranks, per-row records gathered from every
rank, the summary (metrics, the results file, the report table) on rank 0 and its metrics broadcast.
A task supplies only its per-batch step and its summary (`Task.eval_step`, `Task.summarize`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from vlforge.datasets.shards import DataError


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


def own_storage(values: list[Any]) -> list[Any]:
    """Each tensor row as a tensor of its own: a row of a batch (`list(batch_tensor)`) is a view that
    pickles its whole batch, so gathering a split's rows would send every batch once per row."""
    return [v.clone() if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes() > v.nbytes else v
            for v in values]


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


@dataclass
class EvalStep:
    """What one evaluation batch gives: per-row values to gather from every rank, key by key (a key's
    lists are concatenated in rank order), and rows of this rank's report table."""
    records: dict[str, list[Any]]
    table: list[list[Any]] = field(default_factory=list)


def merge_records(parts: list[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    """Every rank's records as one dict, each key's lists joined in rank order (a key no rank recorded
    is absent; one some ranks lack is joined from the others)."""
    merged: dict[str, list[Any]] = {}
    for part in parts:
        for key, values in part.items():
            merged.setdefault(key, []).extend(values)
    return merged


def model_device(model: nn.Module) -> torch.device:
    """Where `model` computes: its first parameter's device (under ZeRO-3 a placeholder on the right
    device), or its first buffer's, or the CPU."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
