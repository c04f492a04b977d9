"""The evaluation scaffold every task runs through: a task's step sees each batch on the model's
device, its records are joined in order, the report table is capped, and the summary gets both."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlforge.core.distributed import DistEnv
from vlforge.tasks.base import Task
from vlforge.tasks.evaluation import EvalResult, EvalStep, merge_records


class _Doubler(Task):
    """Records twice each batch's values; the summary is their sum and what the table holds."""

    report_images = 3

    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches
        self.seen_rows: list[int] = []

    def train_sample(self, data):  # not used by evaluation
        raise NotImplementedError

    def eval_sample(self, data):
        raise NotImplementedError

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
        return EvalResult(metrics={"sum": sum(records["doubled"]), "batches": float(len(records["batches"]))},
                          table_rows=table, results=[{"value": v} for v in records["doubled"]])


class _Double(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_the_scaffold_joins_the_records_caps_the_table_and_summarizes() -> None:
    task = _Doubler([{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 4.0])}, {"x": torch.tensor([5.0])}])
    result = task.evaluate(_Double(), "val", data=None, dist_env=DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "python"), seed=0)
    assert result.metrics == {"sum": 30.0, "batches": 3.0}
    assert [r["value"] for r in result.results] == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert result.table_rows == [[2.0], [4.0], [6.0]]  # report_images rows, in order
    assert task.seen_rows == [3, 1, 0]  # each step is told how many rows the table still takes


def test_merge_joins_each_key_in_rank_order_and_keeps_keys_some_ranks_lack() -> None:
    parts = [{"id": [1, 2], "text": ["a"]}, {}, {"id": [3]}]
    assert merge_records(parts) == {"id": [1, 2, 3], "text": ["a"]}
