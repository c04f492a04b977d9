"""Data that a recipe needs before the loaders start: the built-in demo dataset, built on first use."""
from __future__ import annotations

from vlforge.config.schema import DataConfig
from vlforge.core.distributed import DistEnv
from vlforge.datasets.demo import build_demo_dataset


def prepare_data(data: DataConfig, dist_env: DistEnv) -> None:
    if data.demo is None:
        return
    if dist_env.is_main:
        print(f"vlforge: demo dataset at {data.demo.root} (built on first use)", flush=True)
    # Every rank calls it: the builder locks, builds once, and the others wait for it and reuse it.
    build_demo_dataset(data.demo)
