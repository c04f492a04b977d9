"""The same global batch gives the same losses on 1 rank (python), 2 ranks (deepspeed) and 2 nodes of
one rank each (two torchrun processes rendezvousing over loopback, as on two machines)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    BIN,
    REPO,
    SMALL_DEMO,
    check,
    deepspeed_cmd,
    free_port,
    launch,
    python_cmd,
    read_metrics,
    series,
)

STEPS = 10
GLOBAL_BATCH = 16


def _args(run_dir: Path, ranks: int) -> list[str]:
    return [
        # The ViT tower: BatchNorm (the demo's ResNet) keeps per-rank statistics, which no split can match.
        "recipe=clip_demo", "model=clip_tiny_vit", *SMALL_DEMO, f"run_dir={run_dir}", "deepspeed=zero3",
        f"data.batch_size={GLOBAL_BATCH // ranks}", "data.num_workers=0",
        # Every rank reads the stream in the same order and keeps every world-th sample, so the
        # global batch of each step is the same set of samples whatever the world size.
        "data.train.split_by=sample", "data.train.shuffle_buffer=0",
        f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.save_at_end=false",
        "trainer.eval_at_end=false",
    ]


@pytest.mark.slow
def test_zero3_two_ranks_match_one_rank(e2e_env: dict[str, str], tmp_path: Path) -> None:
    one = check(launch(python_cmd(*_args(tmp_path / "one", 1)), e2e_env))
    two = check(launch(deepspeed_cmd(2, *_args(tmp_path / "two", 2)), e2e_env))
    ref = series(read_metrics(tmp_path / "one"), "train/loss")
    got = series(read_metrics(tmp_path / "two"), "train/loss")
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert sorted(got) == sorted(ref)
    for step, value in ref.items():
        assert abs(got[step] - value) <= 1e-4 * abs(value), (step, value, got[step])
    assert ref[STEPS] < ref[1], "the loss should fall over the first steps"

    # ZeRO-3 partitions the parameters: each of the two ranks holds about half of them.
    params = read_metrics(tmp_path / "two")[0]
    assert params["run/world_size"] == 2
    assert abs(params["run/parameters_rank0"] / params["run/parameters"] - 0.5) < 0.01
    assert "2 rank(s) via deepspeed" in two.output and "1 rank(s) via python" in one.output

    # torchrun as two nodes of one process each, on loopback (node 0 hosts the rendezvous).
    port = free_port()
    nodes = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py",
                               *_args(tmp_path / "torchrun", 2)],
                              cwd=REPO, env=e2e_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [proc.communicate(timeout=600)[0] for proc in nodes]
    assert [proc.returncode for proc in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 rank(s) via torchrun" in outputs[0]
    via_torchrun = series(read_metrics(tmp_path / "torchrun"), "train/loss")
    for step, value in ref.items():
        assert abs(via_torchrun[step] - value) <= 1e-4 * abs(value), (step, value, via_torchrun[step])
