"""Which threads of a server process may start CPU thread teams for torch's operators.

torch's CPU operators run on OpenMP. Each thread that runs a parallel operator gets a team of OpenMP
threads of its own, kept for as long as that thread lives. When a process holds more such threads
than it has cores, GNU OpenMP stops letting idle team threads wait spinning and puts them to sleep
at once, so every parallel operator of the model's step then waits for its team to wake (the cost,
measured: docs/benchmarks.md, "A LLaVA-style model served in int8").

So in a server only the scheduler's worker runs torch's operators in parallel (`own_cpu_threads`);
request threads that prepare images run them on themselves alone (`serial_cpu_ops`); and the model
is loaded by a thread that ends with the load (`in_thread_of_its_own`), taking its team with it.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

_serial = threading.local()


def own_cpu_threads(count: int) -> None:
    """The calling thread runs torch's CPU operators on `count` threads."""
    torch.get_num_threads()  # torch sets a thread's count on its first use; that must come before ours
    torch.set_num_threads(count)


def serial_cpu_ops() -> None:
    """The calling thread runs torch's CPU operators on itself alone (once per thread). torch also
    takes this count as the default of threads that have not yet used an operator."""
    if not getattr(_serial, "set", False):
        own_cpu_threads(1)
        _serial.set = True


def in_thread_of_its_own(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` on a new thread that ends when it returns, with the calling thread's count of CPU
    threads (not the default `serial_cpu_ops` may have left); its result or its exception."""
    outcome: dict[str, object] = {}
    count = torch.get_num_threads()

    def run() -> None:
        try:
            own_cpu_threads(count)
            outcome["result"] = fn(*args)
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name=f"vlforge-{getattr(fn, '__name__', 'task')}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]
