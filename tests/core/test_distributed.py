"""Launcher normalisation: every launcher's environment becomes RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*."""
from __future__ import annotations

import os

import pytest

import vlforge.core.distributed as distributed
from vlforge.core.distributed import (
    DistEnv,
    expand_slurm_nodelist,
    parse_slurm_nodelist,
    prepare_launch_env,
    read_dist_env,
    strip_local_rank_arg,
)


@pytest.fixture(autouse=True)
def _cuda(monkeypatch):
    """Pretend there is a GPU unless a test says otherwise, so DS_ACCELERATOR is only set where asked."""
    monkeypatch.setattr(distributed, "_cuda_available", lambda: True)


# --- strip_local_rank_arg ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected_argv, expected_rank",
    [
        (["train.py", "--local_rank=3", "recipe=clip_demo"], ["train.py", "recipe=clip_demo"], 3),
        (["train.py", "--local_rank", "3", "recipe=clip_demo"], ["train.py", "recipe=clip_demo"], 3),
        (["train.py", "recipe=clip_demo", "--local-rank=1"], ["train.py", "recipe=clip_demo"], 1),
        (["train.py", "recipe=clip_demo", "trainer.max_steps=3"], ["train.py", "recipe=clip_demo", "trainer.max_steps=3"], None),
    ],
    ids=["equals", "separate", "dash", "absent"],
)
def test_strip_local_rank_arg(argv, expected_argv, expected_rank):
    out, rank = strip_local_rank_arg(argv)
    assert out == expected_argv
    assert rank == expected_rank
    assert argv[0] == "train.py"  # the input is not modified in place


def test_strip_local_rank_arg_leaves_lookalikes():
    argv = ["train.py", "--local_ranks=2", "trainer.local_rank=4"]
    assert strip_local_rank_arg(argv) == (argv, None)


# --- expand_slurm_nodelist --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu5", ["gpu5"]),
        ("a[1-2],b[08-10]", ["a1", "a2", "b08", "b09", "b10"]),
        ("node[1-2]", ["node1", "node2"]),
        ("x[7]", ["x7"]),
        ("n[1-2]-ib,gpu[07,09-10]", ["n1-ib", "n2-ib", "gpu07", "gpu09", "gpu10"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("login-1,n[9-11].cluster", ["login-1", "n9.cluster", "n10.cluster", "n11.cluster"]),
    ],
)
def test_parse_slurm_nodelist(nodelist, hosts):
    assert parse_slurm_nodelist(nodelist) == hosts


def test_parse_slurm_nodelist_names_unbalanced_brackets():
    with pytest.raises(ValueError, match=r"'n\[1-2-ib': unbalanced brackets"):
        parse_slurm_nodelist("n[1-2-ib")


def _fake_scontrol(tmp_path, monkeypatch, script: str) -> None:
    tool = tmp_path / "scontrol"
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_expand_slurm_nodelist_asks_scontrol(tmp_path, monkeypatch):
    # SLURM's own expansion wins where scontrol runs, whatever the pattern.
    _fake_scontrol(tmp_path, monkeypatch, 'test "$1 $2" = "show hostnames" && printf "alpha\\nbeta-ib\\n"')
    assert expand_slurm_nodelist("weird[1-2]-list") == ["alpha", "beta-ib"]


def test_expand_slurm_nodelist_parses_where_scontrol_fails_or_is_absent(tmp_path, monkeypatch):
    _fake_scontrol(tmp_path, monkeypatch, "exit 1")
    assert expand_slurm_nodelist("n[1-2]-ib") == ["n1-ib", "n2-ib"]
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert expand_slurm_nodelist("n[1-2]-ib") == ["n1-ib", "n2-ib"]


# --- prepare_launch_env -----------------------------------------------------------------------------


def test_deepspeed_launcher_sets_local_rank_and_keeps_rank():
    env = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"}
    argv = prepare_launch_env(["train.py", "--local_rank=1", "recipe=clip_demo"], env)
    assert argv == ["train.py", "recipe=clip_demo"]
    assert env["LOCAL_RANK"] == "1"
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8"
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29600"
    assert env["VLFORGE_LAUNCHER"] == "deepspeed"
    assert "DS_ACCELERATOR" not in env


def test_torchrun_launcher_keeps_torch_variables():
    env = {
        "TORCHELASTIC_RUN_ID": "abc",
        "RANK": "2",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "host0",
        "MASTER_PORT": "29400",
    }
    before = dict(env)
    argv = prepare_launch_env(["train.py", "recipe=clip_demo"], env)
    assert argv == ["train.py", "recipe=clip_demo"]
    assert env["VLFORGE_LAUNCHER"] == "torchrun"
    assert {k: env[k] for k in before} == before
    dist_env = read_dist_env(env)
    assert dist_env == DistEnv(
        rank=2, world_size=4, local_rank=0, local_world_size=2, master_addr="host0", master_port=29400, launcher="torchrun"
    )
    assert not dist_env.is_main


def test_srun_launcher_maps_slurm_variables():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_JOB_ID": "1234",
    }
    prepare_launch_env(["train.py"], env)
    assert env["VLFORGE_LAUNCHER"] == "slurm"
    assert env["RANK"] == "3"
    assert env["WORLD_SIZE"] == "8"
    assert env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "node1"
    assert env["MASTER_PORT"] == str(20000 + 1234 * 7 % 20000)
    dist_env = read_dist_env(env)
    assert (dist_env.rank, dist_env.world_size, dist_env.local_rank, dist_env.local_world_size) == (3, 8, 1, 4)
    assert (dist_env.master_addr, dist_env.master_port, dist_env.launcher) == ("node1", 28638, "slurm")


def test_srun_port_is_job_and_restart_specific():
    ports = set()
    for job, restart in (("1234", "0"), ("1235", "0"), ("1234", "1")):  # a requeued job keeps its id
        env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n1", "SLURM_JOB_ID": job,
               "SLURM_RESTART_COUNT": restart}
        prepare_launch_env(["train.py"], env)
        ports.add(int(env["MASTER_PORT"]))
        assert 20000 <= int(env["MASTER_PORT"]) < 40000
    assert len(ports) == 3


def test_plain_python_is_a_single_process_job():
    env: dict[str, str] = {}
    argv = prepare_launch_env(["train.py", "recipe=clip_demo"], env)
    assert argv == ["train.py", "recipe=clip_demo"]
    assert env["VLFORGE_LAUNCHER"] == "python"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("0", "1", "0", "1")
    assert env["MASTER_ADDR"] == "127.0.0.1"
    port = int(env["MASTER_PORT"])
    assert 0 < port < 65536
    # A free port: nothing is listening on it, so it can be bound.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    dist_env = read_dist_env(env)
    assert dist_env.is_main and dist_env.world_size == 1 and dist_env.launcher == "python"


def test_rank_and_world_size_in_env_are_used_as_given():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    prepare_launch_env(["train.py"], env)
    assert env["VLFORGE_LAUNCHER"] == "env"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")
    assert env["MASTER_PORT"] == "29500"  # multi-process jobs need an agreed port, not a random one


def test_cpu_accelerator_selected_without_cuda(monkeypatch):
    monkeypatch.setattr(distributed, "_cuda_available", lambda: False)
    env: dict[str, str] = {}
    prepare_launch_env(["train.py"], env)
    assert env["DS_ACCELERATOR"] == "cpu"


def test_explicit_accelerator_is_kept(monkeypatch):
    monkeypatch.setattr(distributed, "_cuda_available", lambda: False)
    env = {"DS_ACCELERATOR": "cuda"}
    prepare_launch_env(["train.py"], env)
    assert env["DS_ACCELERATOR"] == "cuda"


def test_no_cpu_accelerator_with_cuda():
    env: dict[str, str] = {}
    prepare_launch_env(["train.py"], env)
    assert "DS_ACCELERATOR" not in env


# --- read_dist_env ----------------------------------------------------------------------------------


def test_read_dist_env_defaults():
    dist_env = read_dist_env({})
    assert dist_env == DistEnv(
        rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=29500, launcher="env"
    )
    assert dist_env.is_main


def test_read_dist_env_guesses_local_world_size_from_visible_devices():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert read_dist_env(env).local_world_size == 4
    # Never more local ranks than ranks in the job.
    assert read_dist_env({"WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}).local_world_size == 2
    # Without any hint, a single node is assumed.
    assert read_dist_env({"WORLD_SIZE": "4"}).local_world_size == 4


def test_read_dist_env_explicit_local_world_size_wins():
    env = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert read_dist_env(env).local_world_size == 2


def test_local_rank_without_a_value_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--local_rank needs a rank number"):
        strip_local_rank_arg(["train.py", "--local_rank"])


def test_a_submitit_job_forgets_the_submitting_processs_launch_variables():
    # What `python launch/train.py -m hydra/launcher=vlforge_slurm` left in the environment it passes on.
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "41000", "VLFORGE_LAUNCHER": "python", "DS_ACCELERATOR": "cpu", "VLFORGE_AUTO_DS_ACCELERATOR": "1",
           "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "node[1-2]",
           "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_ID": "9"}
    prepare_launch_env([], env, fresh=True)
    assert (env["RANK"], env["WORLD_SIZE"], env["VLFORGE_LAUNCHER"]) == ("1", "2", "slurm")
    assert env["MASTER_PORT"] == str(20000 + 9 * 7) and env["MASTER_ADDR"] != "127.0.0.1"
