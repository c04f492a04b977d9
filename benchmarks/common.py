"""What every benchmark here shares: the machine's matmul peak, timed steps (median of repeats after
warm-up), and the side-by-side table with ratios against a peer."""
from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


def setup_cpu() -> str:
    """Denormals flushed (fresh models otherwise run many times slower on CPU); fp32. Returns the device."""
    torch.set_flush_denormal(True)
    return "cuda" if torch.cuda.is_available() else "cpu"


def matmul_peak_flops(device: str, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10) -> float:
    """The best of `repeats` size^3 matmuls, in FLOP/s (2 per multiply-add), in this process."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)
    samples_per_step: int = 1
    flops_per_step: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def throughput(self) -> float:
        return self.samples_per_step / self.median


def time_steps(name: str, step: Callable[[], None], device: str, samples: int, warmup: int = 2,
               repeats: int = 5, flops_per_step: float = 0.0) -> Timing:
    """Median of `repeats` calls of `step` after `warmup` calls (the first ones allocate and plan)."""
    gc.collect()
    for _ in range(warmup):
        step()
    sync(device)
    timing = Timing(name, samples_per_step=samples, flops_per_step=flops_per_step)
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        timing.seconds.append(time.perf_counter() - start)
    return timing


def table(title: str, rows: list[Timing], peak: float, baseline: str | None = None) -> str:
    """A markdown table: throughput, median step, achieved FLOP/s as a share of the matmul peak (MFU),
    and each row's throughput over the baseline's (the peer: the faster one when there are two)."""
    base = next((r for r in rows if r.name == baseline), None)
    lines = [f"### {title}", "", f"matmul peak here: {peak / 1e9:.0f} GFLOP/s", "",
             "| run | samples/s | median step (s) | GFLOP/s | MFU | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        achieved = r.flops_per_step / r.median if r.flops_per_step else 0.0
        ratio = f"{r.throughput / base.throughput:.2f}x" if base is not None else ""
        lines.append(f"| {r.name} | {r.throughput:.3f} | {r.median:.3f} | {achieved / 1e9:.0f} | "
                     f"{achieved / peak:.0%} | {ratio} |")
    return "\n".join(lines)


def environment() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
