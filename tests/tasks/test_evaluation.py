"""The evaluation scaffold every task runs through: a task's step sees each batch without gradients,
its records are joined in rank order, the report table is capped, and the summary gets both; on
two ranks, a rank out of batches keeps stepping in lockstep without recording, and rank 0's summary
reaches the other rank as metrics.

Module-level imports stay light: the 2-process test spawns workers that import this module."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.gloo import run_on_ranks
from vlforge.core.distributed import DistEnv
from vlforge.tasks.base import Task
from vlforge.tasks.evaluation import EvalResult, EvalStep, merge_records


class _Doubler(Task):
    """Records twice each batch's values; the summary is their sum and what the table holds."""

    report_images = 3

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self.seen_rows: list[int] = []
        self.summaries = 0

    def train_sample(self, data):
        raise AssertionError("evaluation must not build training samples")

    def eval_sample(self, data):
        raise AssertionError("this task's eval_loader yields ready batches: no sample is built")

    def eval_loader(self, split_name, data, dist_env, seed):
        return self.batches

    def eval_state(self, model: nn.Module, data: Any, split: str) -> str:
        return f"state for {split}"

    def eval_step(self, model: nn.Module, batch: dict, state: str, report_rows: int) -> EvalStep:
        assert state == "state for val" and not torch.is_grad_enabled()
        self.seen_rows.append(report_rows)
        doubled = model(batch["x"]).tolist()
        return EvalStep({"doubled": doubled, "batches": [1]}, [[v] for v in doubled[:report_rows]])

    def summarize(self, records: dict[str, list[Any]], table: list[list[Any]], state: str) -> EvalResult:
        self.summaries += 1
        return EvalResult(metrics={"sum": sum(records["doubled"]), "batches": float(len(records["batches"]))},
                          table_rows=table, results=[{"value": v} for v in records["doubled"]])


def _env(rank: int, world: int) -> DistEnv:
    return DistEnv(rank, world, rank, world, "127.0.0.1", 0, "python")


class _Double(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_the_scaffold_joins_the_records_caps_the_table_and_summarizes() -> None:
    task = _Doubler([{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 4.0])}, {"x": torch.tensor([5.0])}])
    result = task.evaluate(_Double(), "val", data=None, dist_env=_env(0, 1), seed=0)
    assert result.metrics == {"sum": 30.0, "batches": 3.0}
    assert [r["value"] for r in result.results] == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert result.table_rows == [[2.0], [4.0], [6.0]]  # report_images rows, in order
    assert task.seen_rows == [3, 1, 0]  # each step is told how many rows the table still takes


def test_rows_of_a_batch_are_recorded_with_storage_of_their_own() -> None:
    # A split's rows are gathered by pickling: a view would send its whole batch once per row.
    class _RowTask(_Doubler):
        def eval_step(self, model, batch, state, report_rows):
            return EvalStep({"rows": list(batch["x"]), "kept": [batch["x"]]}, [])

        def summarize(self, records, table, state):
            self.records = records
            return EvalResult(metrics={})

    batch = torch.arange(64 * 8, dtype=torch.float32).view(64, 8)
    task = _RowTask([{"x": batch}])
    task.evaluate(nn.Identity(), "val", data=None, dist_env=_env(0, 1), seed=0)
    rows = task.records["rows"]
    assert all(row.untyped_storage().nbytes() == row.nbytes == 32 for row in rows)
    assert torch.equal(torch.stack(rows), batch)
    assert len(pickle.dumps(rows)) < 2 * batch.nbytes + 64 * 1024  # a view each would pickle 64 batches
    assert task.records["kept"][0].untyped_storage().data_ptr() == batch.untyped_storage().data_ptr()  # whole tensors as they are


def test_merge_joins_each_key_in_rank_order_and_keeps_keys_some_ranks_lack() -> None:
    parts = [{"id": [1, 2], "text": ["a"]}, {}, {"id": [3]}]
    assert merge_records(parts) == {"id": [1, 2, 3], "text": ["a"]}


def _two_rank_worker(rank: int, world: int, out_dir: str) -> None:
    # Rank 0 holds three batches, rank 1 one: rank 1 repeats its batch twice more, unrecorded.
    batches = ([{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0])}, {"x": torch.tensor([4.0])}] if rank == 0
               else [{"x": torch.tensor([10.0, 20.0])}])
    task = _Doubler(batches)
    result = task.evaluate(_Double(), "val", data=None, dist_env=_env(rank, world), seed=0)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"metrics": result.metrics, "results": result.results, "steps": len(task.seen_rows),
         "summaries": task.summaries}))


def test_two_ranks_step_together_record_real_batches_and_share_rank0s_metrics(tmp_path: Path) -> None:
    run_on_ranks(2, _two_rank_worker, str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0["steps"] == rank1["steps"] == 3  # lockstep: rank 1 stepped on its last batch twice more
    # Rank 0's rows then rank 1's, the repeated batch not counted.
    assert [r["value"] for r in rank0["results"]] == [2.0, 4.0, 6.0, 8.0, 20.0, 40.0]
    assert rank0["metrics"] == rank1["metrics"] == {"sum": 80.0, "batches": 4.0}
    assert (rank0["summaries"], rank1["summaries"]) == (1, 0) and rank1["results"] == []
