"""What every benchmark here shares: the machine's matmul peak, timed steps (median of repeats after
warm-up), and the side-by-side table with ratios against a peer."""
from __future__ import annotations

import contextlib
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


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def setup(precision: str | None) -> tuple[str, torch.dtype]:
    """(device, compute dtype): a GPU when there is one, bf16 there by default (the GPU variant of the
    benchmarks); fp32 on CPU, where bf16 matmuls are slower than fp32 on most machines."""
    device = setup_cpu()
    return device, PRECISIONS[precision or ("bf16" if device == "cuda" else "fp32")]


def autocast(device: str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for every run of a table alike (off in fp32)."""
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)


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
    peak_mib: float | None = None  # on a GPU: the most memory allocated during the timed steps

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
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
    for _ in range(warmup):
        step()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the timed steps' peak, not the warm-up's
    timing = Timing(name, samples_per_step=samples, flops_per_step=flops_per_step)
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        timing.seconds.append(time.perf_counter() - start)
    if cuda:
        timing.peak_mib = torch.cuda.max_memory_allocated() / 2**20
    return timing


def time_interleaved(runs: list[tuple[str, Callable[[], None], int, float]], device: str, warmup: int = 2,
                     repeats: int = 5) -> list[Timing]:
    """`time_steps` for several runs (name, step, samples per step, FLOPs per step) whose timed steps
    alternate, so that a machine whose speed drifts during the benchmark (this 2-core machine drifts by
    10-15% between minutes) slows every run alike instead of the last one. The order rotates each
    repeat (a b c, b c a, c a b, ...): with a fixed order the same model's forward measured 2.77 s when
    timed first and 2.23 s when timed second (CLIP ViT-B/16 here), a bias a fixed order gives one run."""
    gc.collect()
    timings = [Timing(name, samples_per_step=samples, flops_per_step=flops) for name, _, samples, flops in runs]
    for _, step, _, _ in runs:
        for _ in range(warmup):
            step()
    sync(device)
    for repeat in range(repeats):
        order = [(repeat + i) % len(runs) for i in range(len(runs))]
        for timing, (_, step, _, _) in ((timings[i], runs[i]) for i in order):
            start = time.perf_counter()
            step()
            sync(device)
            timing.seconds.append(time.perf_counter() - start)
    return timings


def table(title: str, rows: list[Timing], peak: float, baseline: str | None = None) -> str:
    """A markdown table: throughput, median step, achieved FLOP/s as a share of the matmul peak (MFU),
    and each row's throughput over the baseline's (the peer: the faster one when there are two)."""
    base = next((r for r in rows if r.name == baseline), None)
    memory = any(r.peak_mib is not None for r in rows)
    lines = [f"### {title}", "", f"matmul peak here: {peak / 1e9:.0f} GFLOP/s", "",
             "| run | samples/s | median step (s) | GFLOP/s | MFU | ratio |" + (" peak MiB |" if memory else ""),
             "|---|---|---|---|---|---|" + ("---|" if memory else "")]
    for r in rows:
        achieved = r.flops_per_step / r.median if r.flops_per_step else 0.0
        ratio = f"{r.throughput / base.throughput:.2f}x" if base is not None else ""
        lines.append(f"| {r.name} | {r.throughput:.3f} | {r.median:.3f} | {achieved / 1e9:.0f} | "
                     f"{achieved / peak:.0%} | {ratio} |" + (f" {r.peak_mib:.0f} |" if memory else ""))
    return "\n".join(lines)


def environment() -> str:
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
