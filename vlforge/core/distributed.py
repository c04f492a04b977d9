"""Distributed state, read from the environment in one place.

Launchers disagree on how they describe a process: `deepspeed` passes `--local_rank=N` on argv and sets
RANK/WORLD_SIZE/LOCAL_RANK, `torchrun` sets the torch variables, `srun` sets SLURM_*, and plain `python`
sets nothing. `prepare_launch_env` turns all of them into the torch variables before anything else runs.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, MutableMapping, Sequence

_LOCAL_RANK_ARG = re.compile(r"^--local[_-]rank(?:=(\d+))?$")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def strip_local_rank_arg(argv: Sequence[str]) -> tuple[list[str], int | None]:
    """Remove `--local_rank=N` / `--local_rank N` (added by the deepspeed launcher; Hydra rejects it)."""
    out: list[str] = []
    local_rank = None
    i = 0
    while i < len(argv):
        match = _LOCAL_RANK_ARG.match(argv[i])
        if match is None:
            out.append(argv[i])
        elif match.group(1) is not None:
            local_rank = int(match.group(1))
        elif i + 1 < len(argv) and argv[i + 1].isdigit():
            local_rank = int(argv[i + 1])
            i += 1
        else:
            raise ValueError(f"{argv[i]} needs a rank number after it")
        i += 1
    return out, local_rank


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ValueError(f"SLURM node list {text!r}: unbalanced brackets")
    return parts + [current]


def _expand_host(pattern: str) -> list[str]:
    """One host pattern, any number of bracket groups anywhere in it: `n[1-2]-ib` or `r[1-2]n[01-02]`."""
    opened = pattern.find("[")
    if opened < 0:
        return [pattern]
    closed = pattern.index("]", opened)
    prefix, ranges, rest = pattern[:opened], pattern[opened + 1:closed], pattern[closed + 1:]
    values: list[str] = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        values += [lo] if not hi else [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    return [prefix + value + tail for value in values for tail in _expand_host(rest)]


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list, expanded as `scontrol show hostnames` does:
    `n[1-2]-ib,gpu[07,09-10]` -> ['n1-ib', 'n2-ib', 'gpu07', 'gpu09', 'gpu10']."""
    return [host for item in _split_top_level(nodelist) if item for host in _expand_host(item)]


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list, by `scontrol show hostnames` where scontrol runs (SLURM's own
    reading), else by `parse_slurm_nodelist`."""
    try:
        done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return parse_slurm_nodelist(nodelist)
    hosts = done.stdout.split()
    return hosts if done.returncode == 0 and hosts else parse_slurm_nodelist(nodelist)


def slurm_node_address(node: str) -> str:
    """The address SLURM reaches `node` by (its NodeAddr), which may differ from a name that does not
    resolve; the name itself when scontrol cannot say."""
    try:
        out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    found = re.search(r"\bNodeAddr=(\S+)", out)
    return found.group(1) if found else node


def slurm_master_port(env: MutableMapping[str, str]) -> int:
    """A port unique to the job and to each of its restarts: two jobs sharing a node do not collide,
    and a requeued job (same id) does not wait on its previous run's socket."""
    job, restart = int(env.get("SLURM_JOB_ID", "0")), int(env.get("SLURM_RESTART_COUNT", "0"))
    return 20000 + (job * 7 + restart) % 20000


def _detect_launcher(env: MutableMapping[str, str], argv_local_rank: int | None) -> str:
    if argv_local_rank is not None:
        return "deepspeed"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    # SLURM_STEP_NUM_TASKS is set by srun for the tasks of a step, not in the batch script itself.
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return "slurm"
    return "python"


# What prepare_launch_env fills in; `fresh` drops these first (values that came from elsewhere).
_FILLED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLFORGE_LAUNCHER")

_AUTO_ACCELERATOR = "VLFORGE_AUTO_DS_ACCELERATOR"  # set when DS_ACCELERATOR=cpu was our choice, not the user's


def prepare_launch_env(argv: list[str] | None = None, env: MutableMapping[str, str] | None = None,
                       fresh: bool = False) -> list[str]:
    """Normalise every launcher to RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; return argv without --local_rank.

    Also selects DeepSpeed's CPU accelerator when there is no CUDA device, before deepspeed is imported.
    `fresh` first forgets what an earlier call filled in: a job that submitit starts on a compute
    node inherits the environment of the process that submitted it (one rank, a local port, and
    the CPU accelerator of a login node without GPUs).
    """
    argv = list(sys.argv if argv is None else argv)
    env = os.environ if env is None else env
    if fresh and env.get("VLFORGE_LAUNCHER"):
        for name in _FILLED:
            env.pop(name, None)
        if env.pop(_AUTO_ACCELERATOR, None):
            env.pop("DS_ACCELERATOR", None)
    argv, argv_local_rank = strip_local_rank_arg(argv)
    launcher = _detect_launcher(env, argv_local_rank)
    if launcher == "deepspeed":
        env["LOCAL_RANK"] = str(argv_local_rank)
    elif launcher == "slurm":
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0])
        nodes = expand_slurm_nodelist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost")))
        env.setdefault("MASTER_ADDR", slurm_node_address(nodes[0]) if nodes else "localhost")
        env.setdefault("MASTER_PORT", str(slurm_master_port(env)))
    elif launcher == "python":
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("LOCAL_WORLD_SIZE", "1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()) if env.get("WORLD_SIZE") == "1" else "29500")
    env["VLFORGE_LAUNCHER"] = launcher
    default_ds_accelerator(env)
    return argv


def default_ds_accelerator(env: MutableMapping[str, str] | None = None) -> None:
    """DeepSpeed's CPU accelerator when there is no CUDA device and the user chose none; call it before
    deepspeed is imported (launchers, and export / load_model reading a ZeRO checkpoint)."""
    env = os.environ if env is None else env
    if "DS_ACCELERATOR" not in env and not _cuda_available():
        env["DS_ACCELERATOR"] = "cpu"
        env[_AUTO_ACCELERATOR] = "1"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def read_dist_env(env: MutableMapping[str, str] | None = None) -> DistEnv:
    """The process's place in the job, from the torch variables that `prepare_launch_env` guarantees."""
    env = os.environ if env is None else env
    world_size = int(env.get("WORLD_SIZE", "1"))
    return DistEnv(
        rank=int(env.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(_guess_local_world_size(env, world_size)))),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", "29500")),
        launcher=env.get("VLFORGE_LAUNCHER", "env"),
    )


def _guess_local_world_size(env: MutableMapping[str, str], world_size: int) -> int:
    # The deepspeed launcher does not export LOCAL_WORLD_SIZE; CUDA_VISIBLE_DEVICES lists this node's GPUs.
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return min(world_size, len(visible.split(",")))
    return world_size


def init_distributed(dist_env: DistEnv) -> None:
    """Start the process group (NCCL on GPUs, gloo on CPU) and bind this rank to its device and cores."""
    import deepspeed
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one host share its cores; oversubscribing them slows every rank down.
            cores = len(os.sched_getaffinity(0))
            torch.set_num_threads(max(1, cores // max(1, dist_env.local_world_size)))
        torch.set_flush_denormal(True)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    if backend == "gloo" and dist_env.world_size > 1:
        unlink_shared_memory_buffer(dist_env.rank)


def shared_memory_buffer(rank: int, env: Mapping[str, str] = os.environ) -> Path:
    """The file DeepSpeed's CPU all-reduce maps for `rank` when every rank is on one host (its shm op
    names it by user, MASTER_ADDR, MASTER_PORT and rank)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"
    return Path("/dev/shm") / name


def unlink_shared_memory_buffer(rank: int) -> None:
    """Remove this rank's all-reduce buffer file once every rank has mapped every buffer (DeepSpeed maps
    them all while the process group starts): the memory stays mapped until the ranks exit, and no
    file is left behind, however a rank ends. DeepSpeed never removes them itself, so each run left
    one file per rank (about 66 MB each)."""
    import torch.distributed as dist

    dist.barrier()
    shared_memory_buffer(rank).unlink(missing_ok=True)
