"""Run the launchers as a user would, on a small demo dataset built once per session."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
from omegaconf import OmegaConf

from vlforge.datasets.shards import DataEvent, expand_shard_spec, iter_shard

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TEST_RECIPES = Path(__file__).resolve().parent / "recipes"

# A small demo dataset: same generator as the real one, fewer images, 64-sample shards.
SMALL_DEMO = [
    "data.demo.num_train=512",
    "data.demo.num_val=64",
    "data.demo.num_test=64",
    "data.demo.samples_per_shard=64",
    "data.eval_batch_size=32",
    "logger=jsonl",
]

# One process training tests/e2e/recipes' tiny regressor on the small demo, deterministically (no
# workers, no shuffle buffer), logging every step; add trainer.max_steps and what the test varies.
TINY_REGRESSOR_RUN = [
    "recipe=clip_demo", *SMALL_DEMO, f"hydra.searchpath=[file://{TEST_RECIPES}]", "model=tiny_regressor",
    "deepspeed=zero2", "data.num_workers=0", "data.train.shuffle_buffer=0", "trainer.log_every=1",
    "trainer.eval_at_end=false", "optim.lr=0.05", "optim.warmup_steps=0",
]


@dataclass
class Launch:
    returncode: int
    output: str
    seconds: float


def launch(cmd: list[str], env: dict[str, str], timeout: float = 600) -> Launch:
    """Run a launcher command from the repo root, as the README does; output merged for messages."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return Launch(proc.returncode, proc.stdout, time.perf_counter() - start)


def model_states(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model weights a ZeRO-0/1/2 run saved at `step`."""
    states = run_dir / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt"
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def series(rows: list[dict], key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in rows if key in row}


def demo_annotations(run_dir: Path, split: str) -> dict[str, dict]:
    """image_id -> the JSON record of each sample in the demo split a run read (from its saved config)."""
    shards = OmegaConf.load(run_dir / "config.yaml").data[split].shards
    events: list[DataEvent] = []
    records = {}
    for shard in expand_shard_spec(shards):
        for sample in iter_shard(shard, events):
            record = json.loads(sample.files["json"])
            records[record["image_id"]] = record
    assert records and not events, (shards, events)
    return records


@pytest.fixture(scope="session")
def e2e_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VLFORGE_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("VLFORGE_FAIL_AT_STEP", None)
    return env


@pytest.fixture(autouse=True)
def _no_deepspeed_shm_buffers_left() -> Iterator[None]:
    """DeepSpeed's CPU shared-memory all-reduce maps a 66 MB file per rank in /dev/shm, named by the
    rendezvous port; vlforge removes each once every rank has mapped them (core.distributed), so no
    launch may leave one. Any left is removed anyway, so that a failure cannot fill the machine."""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    yield
    left = (set(shm.glob("deepspeed_allreduce_buffer_*")) - before) if shm.is_dir() else set()
    for leftover in left:
        leftover.unlink(missing_ok=True)
    assert not left, f"DeepSpeed shared-memory buffers left behind: {sorted(map(str, left))}"


def python_cmd(*args: str, script: str = "launch/train.py") -> list[str]:
    return [sys.executable, script, *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A fresh rendezvous port per launch: two jobs on the default 29500 fail with EADDRINUSE.
def deepspeed_cmd(num: int, *args: str, script: str = "launch/train.py") -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(num), "--master_port", str(free_port()), script, *args]


def check(result: Launch) -> Launch:
    assert result.returncode == 0, result.output[-6000:]
    return result
