"""The step loop: micro-batches through the engine, logging, evaluation and checkpoints on schedule."""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from vlforge.config.schema import RunConfig
from vlforge.core.checkpoints import complete_checkpoints
from vlforge.core.distributed import DistEnv
from vlforge.core.errors import TrainingError
from vlforge.datasets.loader import ShardLoader
from vlforge.tasks.evaluation import to_device
from vlforge.trainer.checkpoint import rng_state, save_checkpoint
from vlforge.trainer.engine import TrainingEngine
from vlforge.trainer.faults import kill_before_step, poison_loss
from vlforge.trainer.preemption import StopRequest
from vlforge.trainer.tracking import Tracker

log = logging.getLogger(__name__)


def average_batchnorm_statistics(module: torch.nn.Module) -> None:
    """Make every rank's BatchNorm running statistics their mean over ranks.

    DeepSpeed does not broadcast buffers as DDP does, so each rank's running mean and variance follow
    its own batches. Averaged before every evaluation and save (as timm's `distribute_bn`), the
    evaluated and saved model is one model, and evaluating its checkpoint on any number of ranks
    gives the metrics training reported.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            for stat in (layer.running_mean, layer.running_var):
                if stat is not None:
                    dist.all_reduce(stat)
                    stat.div_(world)


def peak_memory_mib(device: torch.device) -> float:
    """The largest peak memory of any rank so far, MiB: the peak of tensors allocated on the GPU, or
    the peak resident set of the process on CPU (the loader's worker processes not counted)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if dist.is_available() and dist.is_initialized():
        value = torch.tensor([peak], dtype=torch.float64, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        peak = float(value.item())
    return peak

class LossMeter:
    """Sums losses on the device and syncs only when read, so steps never wait on the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def read(self) -> dict[str, float]:
        """Means since the last read, averaged over ranks."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        packed = torch.stack([self.sums[n] for n in names]) / self.count
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
            packed /= dist.get_world_size()
        self.sums, self.count = {}, 0
        return dict(zip(names, packed.tolist()))


class Trainer:
    def __init__(
        self,
        engine: TrainingEngine,
        loader: ShardLoader,
        run: RunConfig,
        dist_env: DistEnv,
        tracker: Tracker,
        evaluate: Callable[[str], dict[str, float]],
        grad_accum: int,
        global_batch: int,
    ) -> None:
        self.engine, self.loader, self.run, self.dist_env = engine, loader, run, dist_env
        self.tracker, self.evaluate = tracker, evaluate
        self.grad_accum, self.global_batch = grad_accum, global_batch
        self.run_dir = Path(run.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = engine.device
        self._keys_file = None
        self.stopped_by: signal.Signals | None = None
        self.bad_steps = 0  # skipped for a non-finite loss or gradients, over the run
        self.bad_streak: list[int] = []  # the bad steps since the last good one
        self._bad_loss_ranks: list[int] = []
        self._batchnorm_buffers = [buffer for layer in engine.module.modules()
                                   if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
                                   for buffer in layer.buffers(recurse=False)]
        self.stopped_at: int | None = None
        if run.trainer.record_sample_keys:
            self._keys_file = open(self.run_dir / f"samples_rank{dist_env.rank}.jsonl", "a", encoding="utf-8")

    def rank_state(self, step: int) -> dict[str, Any]:
        return {"step": step, "rng": rng_state(), "data": self.loader.state_dict(), "bad_steps": self.bad_steps}

    def save(self, step: int) -> Path:
        average_batchnorm_statistics(self.engine.module)
        path = save_checkpoint(self.engine, self.ckpt_dir, step, self.rank_state(step), self.dist_env,
                               self.run.trainer.keep_last)
        if self.dist_env.is_main:
            tqdm.write(f"checkpoint: {path}")
        return path

    def _record_keys(self, step: int, micro: int) -> None:
        if self._keys_file is not None:
            self._keys_file.write(json.dumps({"step": step, "micro": micro, "keys": self.loader.last_keys}) + "\n")
            self._keys_file.flush()

    def _train_step(self, batches: Iterator[dict], step: int, meter: LossMeter) -> bool:
        """One optimizer step over `grad_accum` micro-batches (`step` is the number of steps done).
        Returns False for a bad step: a non-finite loss or gradients on any rank. Its update is
        skipped (the optimizers skip a step whose gradients are not finite, `engine.build_optimizer`)
        and its losses are kept out of the logged means; BatchNorm statistics, which its forward passes
        moved, are put back."""
        statistics = [buffer.clone() for buffer in self._batchnorm_buffers]
        losses = []
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        skipped_before = self.engine.skipped_steps
        for micro in range(self.grad_accum):
            batch = to_device(next(batches), self.device)
            self._record_keys(step, micro)
            output = self.engine(batch)
            loss = poison_loss(output.loss, step + 1, self.dist_env.rank)
            finite &= torch.isfinite(loss.detach())
            self.engine.backward(loss)
            self.engine.step()
            losses.append({"loss": loss, **{f"loss_{k}": v for k, v in output.losses.items()}})
        self._bad_loss_ranks = self._ranks_without(finite)
        skipped = self.engine.skipped_steps > skipped_before and not self.engine.fp16_enabled()
        if self._bad_loss_ranks or skipped:
            for buffer, saved in zip(self._batchnorm_buffers, statistics):
                buffer.copy_(saved)
            return False
        for values in losses:
            meter.add(values)
        return True

    def _ranks_without(self, flag: torch.Tensor) -> list[int]:
        """The ranks where `flag` is False (every rank gets the same list)."""
        missing = torch.zeros(self.dist_env.world_size, device=self.device)
        missing[self.dist_env.rank] = float(not bool(flag))
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(missing)
        return [rank for rank, value in enumerate(missing.tolist()) if value]

    def _count_bad_step(self, step: int) -> None:
        """A bad step: counted, reported, and the run stopped after `trainer.max_bad_steps` in a row."""
        self.bad_steps += 1
        self.bad_streak.append(step)
        where = (f"a non-finite loss on rank(s) {', '.join(map(str, self._bad_loss_ranks))}" if self._bad_loss_ranks
                 else "non-finite gradients")
        log.warning("step %d skipped: %s; this rank's batch keys %s", step, where, self.loader.last_keys)
        if self.dist_env.is_main:
            tqdm.write(f"step {step} skipped: {where} (parameters not updated; {self.bad_steps} bad step(s) so far)")
        limit = self.run.trainer.max_bad_steps
        if len(self.bad_streak) >= limit:
            saved = complete_checkpoints(self.ckpt_dir)
            kept = f"the last checkpoint, {saved[-1][1]}, is intact" if saved else "no checkpoint was saved"
            raise TrainingError(
                f"{limit} steps in a row ({self.bad_streak[0]} to {step}) had {where} (trainer.max_bad_steps="
                f"{limit}); none of them updated the parameters and {kept}. The batch keys of each step are in "
                f"{self.run_dir / 'logs'}/rank<N>.log; a lower optim.lr, or trainer.precision=fp32, may help."
            )

    def _step_stats(self, meter: LossMeter, elapsed: float, steps: int) -> dict[str, float]:
        stats = {f"train/{k}": v for k, v in meter.read().items()}
        groups = self.engine.optimizer.param_groups
        base = next((g for g in groups if g.get("lr_multiplier", 1.0) == 1.0), groups[0])
        stats["train/lr"] = float(base["lr"])
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):  # a skipped step's is inf
            stats["train/grad_norm"] = float(grad_norm)
        if self.engine.fp16_enabled():
            stats["train/loss_scale"] = float(self.engine.optimizer.cur_scale)
        stats["train/skipped_steps"] = float(self.engine.skipped_steps)
        stats["train/bad_steps"] = float(self.bad_steps)
        stats["train/samples_per_s"] = steps * self.global_batch / max(elapsed, 1e-9)
        stats["system/peak_memory_mib"] = peak_memory_mib(self.device)
        report = self.loader.report
        stats["data/skipped_samples"] = float(len(report.skipped_samples))
        stats["data/unreadable_shards"] = float(len(report.unreadable_shards))
        return stats

    def _evaluate(self, step: int, splits: tuple[str, ...]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        average_batchnorm_statistics(self.engine.module)
        self.engine.eval()
        for split in splits:
            if getattr(self.run.data, split) is None:
                continue
            result = self.evaluate(split)
            metrics.update({f"{split}/{k}": v for k, v in result.metrics.items()})
            self.tracker.log_table(f"{split}/predictions", result.table_columns, result.table_rows, step)
            self.tracker.save_results(split, step, result.results)
        self.engine.train()
        if metrics:
            self.tracker.log(metrics, step)
            if self.dist_env.is_main:
                tqdm.write(f"eval @ step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        return metrics

    def fit(self, start_step: int) -> dict[str, float]:
        """Train to max_steps, or until a stop signal (`preemption.py`): then `stopped_by` names it and
        the step reached is saved, with no final evaluation."""
        stop_request = StopRequest(self.device)  # before the loader's workers fork
        try:
            return self._fit(start_step, stop_request)
        finally:
            stop_request.restore()
            if self._keys_file is not None:
                self._keys_file.close()

    def _fit(self, start_step: int, stop_request: StopRequest) -> dict[str, float]:
        cfg = self.run.trainer
        meter = LossMeter(self.device)
        batches = iter(self.loader)
        progress = tqdm(total=cfg.max_steps, initial=start_step, disable=not self.dist_env.is_main,
                        desc=self.run.name, dynamic_ncols=True)
        self.engine.train()
        window_start, window_steps = time.perf_counter(), 0
        step = start_step
        while step < cfg.max_steps:
            kill_before_step(step + 1)
            good = self._train_step(batches, step, meter)
            step += 1
            if good:
                self.bad_streak = []
            else:
                self._count_bad_step(step)
            window_steps += 1
            progress.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                stats = self._step_stats(meter, time.perf_counter() - window_start, window_steps)
                self.tracker.log(stats, step)
                if "train/loss" in stats:  # absent when every step since the last log was bad
                    progress.set_postfix(loss=f"{stats['train/loss']:.4f}", lr=f"{stats['train/lr']:.2e}")
                window_start, window_steps = time.perf_counter(), 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                self._evaluate(step, ("val",))
            saved = bool(cfg.save_every) and step % cfg.save_every == 0 and step < cfg.max_steps
            if saved:
                self.save(step)
            self.stopped_by = stop_request.agreed()
            if self.stopped_by is not None:
                progress.close()
                if not saved:
                    self.save(step)
                self.stopped_at = step
                return {}
        progress.close()
        final: dict[str, float] = {}
        if cfg.save_at_end:
            self.save(step)
        if cfg.eval_at_end:
            final = self._evaluate(step, ("val", "test"))
        return final
