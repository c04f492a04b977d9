"""Process groups for tests: N CPU processes over gloo on this machine, each running a function of
its rank (torch.multiprocessing.spawn), with a port nobody else holds."""
from __future__ import annotations

import os
import socket
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # no dependence on the hostname resolving
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(world: int, fn: Callable[..., None], *args: Any) -> None:
    """`fn(rank, world, *args)` in `world` processes joined in one gloo group; `fn` must be importable
    by name (a module-level function) and reports back through files."""
    import torch.multiprocessing as mp

    mp.spawn(_run, args=(world, free_port(), fn, args), nprocs=world, join=True)
