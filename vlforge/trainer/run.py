"""One training run from a composed recipe: the order in which the rooms are put together."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vlforge.config.schema import RunConfig, check_start_paths, validate_config
from vlforge.core.console import attach_log, output_to_log
from vlforge.core.distributed import DistEnv, init_distributed, read_dist_env
from vlforge.core.errors import CheckpointError
from vlforge.datasets.prepare import prepare_data
from vlforge.hub.weights import init_weights
from vlforge.models.towers.base import check_tower_precision
from vlforge.tasks.base import Task
from vlforge.trainer.checkpoint import (
    data_read_before,
    load_checkpoint,
    resolve_resume,
    set_rng_state,
    universal_checkpoint,
    written_by,
)
from vlforge.trainer.engine import (
    TrainingEngine,
    batch_arithmetic,
    build_engine,
    build_model,
    deepspeed_config,
    resolve_precision,
)
from vlforge.trainer.loop import Trainer
from vlforge.trainer.preemption import REQUEUE_SIGNALS, requeue_slurm_job, slurm_job_id
from vlforge.trainer.run_dir import claim_run_dir
from vlforge.trainer.tracking import Tracker

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_task(cfg: DictConfig) -> Task:
    task = instantiate(cfg.task, _convert_="all")
    if not isinstance(task, Task):
        raise TypeError(f"task._target_ {cfg.task._target_} does not build a vlforge Task")
    return task


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total parameters, parameters held by this rank): they differ under ZeRO-3 partitioning."""
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    return total, local


def _say(dist_env: DistEnv, message: str) -> None:
    if dist_env.is_main:
        print(message, flush=True)


@dataclass
class Session:
    """What training and evaluation both start from: the validated recipe, the ranks, the task, and
    the DeepSpeed engine around a freshly built model."""

    cfg: DictConfig
    run: RunConfig
    dist_env: DistEnv
    task: Task
    run_dir: Path
    engine: TrainingEngine
    grad_accum: int
    global_batch: int
    resume_from: Path | None = None  # training: the checkpoint trainer.resume names
    universal: Path | None = None  # its universal form, when it was written by another number of ranks


def _stopped(trainer: Trainer, tracker: Tracker, run: RunConfig, dist_env: DistEnv, report: Any) -> dict[str, float]:
    """After a stop signal: the checkpoint is saved; requeue the SLURM job on SIGUSR1/SIGUSR2 (rank 0)."""
    tracker.finish()
    job = slurm_job_id() if trainer.stopped_by in REQUEUE_SIGNALS and dist_env.is_main else None
    # Said before the requeue: SLURM ends the job's processes as it requeues it, maybe before a later print.
    _say(dist_env, f"vlforge: stopped by {trainer.stopped_by.name} at step {trainer.stopped_at} "
         f"(checkpoint saved; resume=auto continues from it)" + (f" | requeueing SLURM job {job}" if job else ""))
    print(f"vlforge: rank {dist_env.rank} data: {report.summary()}", flush=True)
    if job:
        requeue_slurm_job()  # raises, naming the job and scontrol's message, when SLURM refuses
    return {}


def _listed(what: str, keys: list[str]) -> str:
    return f"; {len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})" if keys else ""


def start_session(cfg: DictConfig, load_init_weights: bool = True, new_run: bool = False) -> Session:
    """`load_init_weights`: start the model from `trainer.init_from` when the recipe names one.
    `new_run`: training, which claims the run directory (`run_dir.claim_run_dir`)."""
    run: RunConfig = validate_config(cfg)
    check_tower_precision(cfg.model.get("vision") or {}, resolve_precision(run.trainer.precision))
    dist_env = read_dist_env()
    batch_arithmetic(run, dist_env.world_size)  # raises on sizes that do not divide, before any compute
    if load_init_weights:
        check_start_paths(run.trainer)
    task = build_task(cfg)
    run_dir = Path(run.run_dir)
    if new_run:
        claim_run_dir(run_dir, run.trainer.resume, run.trainer.overwrite, dist_env.is_main)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = attach_log(run_dir / "logs" / f"rank{dist_env.rank}.log")
    _say(dist_env, f"vlforge: starting {dist_env.world_size} rank(s) via {dist_env.launcher}"
         + (f"; DeepSpeed's build output and third-party warnings go to {log.parent}/rank<N>.log" if log else ""))
    with output_to_log():  # DeepSpeed compiles its CPU communication op here on the first run
        init_distributed(dist_env)
    if dist_env.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    prepare_data(run.data, dist_env)

    ds_config = deepspeed_config(run, dist_env.world_size)
    resume_from, universal = None, None
    if new_run:
        resume_from = resolve_resume(run.trainer.resume, run_dir / "checkpoints")
        if resume_from is not None and written_by(resume_from) != dist_env.world_size:
            universal = universal_checkpoint(resume_from, dist_env)
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
    _, grad_accum, global_batch = batch_arithmetic(run, dist_env.world_size)
    seed_everything(run.trainer.seed)  # the same initial weights on every rank and every world size
    model = build_model(cfg.model, ds_config)
    if load_init_weights and run.trainer.init_from:
        # Before deepspeed.initialize, so the optimizer's fp32 master weights start from these values.
        try:
            loaded, report = init_weights(model, run.trainer.init_from, run.trainer.init_converter,
                                          run.trainer.init_partial)
        except (CheckpointError, KeyError, ValueError) as err:  # converters name a key they cannot map
            detail = err.args[0] if isinstance(err, KeyError) and err.args else err
            raise CheckpointError(f"trainer.init_from={run.trainer.init_from}: {detail}") from None
        _say(dist_env, f"vlforge: {loaded} weights from {run.trainer.init_from}"
             + _listed("checkpoint entries the model has no place for were left out", report.unexpected)
             + _listed("model weights the checkpoint lacks keep their initialisation", report.missing)
             + _listed("model weights the checkpoint shapes differently keep their initialisation", report.mismatched))
    with output_to_log():
        engine = build_engine(model, run, ds_config)
    return Session(cfg, run, dist_env, task, run_dir, engine, grad_accum, global_batch, resume_from, universal)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, evaluate and checkpoint as the recipe says; returns the final evaluation metrics."""
    session = start_session(cfg, new_run=True)
    run, dist_env, task, run_dir, engine = session.run, session.dist_env, session.task, session.run_dir, session.engine
    grad_accum, global_batch = session.grad_accum, session.global_batch
    total, local = parameter_counts(engine.module)

    loader = task.train_loader(run.data, dist_env, run.trainer.seed)
    start_step, bad_steps = 0, 0
    resume_from = session.resume_from
    seed_everything(run.trainer.seed + dist_env.rank)  # dropout etc. differ across ranks
    if resume_from is not None:
        start_step, rank_state = load_checkpoint(engine, resume_from, dist_env, session.universal)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
            loader.load_state_dict(rank_state["data"])
            bad_steps = int(rank_state.get("bad_steps", 0))
        elif session.universal is not None:
            epoch, read = data_read_before(resume_from)
            loader.continue_epoch(epoch, read, dist_env.world_size)
            _say(dist_env, f"vlforge: {resume_from} was written by {written_by(resume_from)} rank(s): weights, "
                 f"optimizer and schedule load through DeepSpeed's universal checkpoint ({session.universal}); "
                 f"epoch {epoch} goes on, each of the {dist_env.world_size} rank(s) skipping its share of the {read} "
                 "samples read in it (which samples differ: shards split over ranks anew); RNG streams start afresh")
        else:
            log.warning("%s holds no state for rank %d: RNG and data position start afresh", resume_from, dist_env.rank)
    elif run.trainer.resume == "auto":
        _say(dist_env, "resume=auto: no complete checkpoint yet, starting from step 0")

    _say(dist_env, (
        f"vlforge: recipe {run.name} | run dir {run_dir.resolve()} | {dist_env.world_size} rank(s) via "
        f"{dist_env.launcher} on {engine.device} | ZeRO-{run.deepspeed.stage} {resolve_precision(run.trainer.precision)} | "
        f"global batch {global_batch} = {run.data.batch_size} x {grad_accum} accum x {dist_env.world_size} | "
        f"{total / 1e6:.2f}M parameters, {local / 1e6:.2f}M on this rank"
        + (f" | resuming from {resume_from} at step {start_step}" if resume_from else "")
    ))
    tracker = Tracker(run.logger, run_dir, run.name, OmegaConf.to_container(cfg, resolve=True), dist_env.is_main)
    tracker.log({"run/parameters": float(total), "run/parameters_rank0": float(local),
                 "run/world_size": float(dist_env.world_size)}, start_step)

    def evaluate(split: str) -> Any:
        return task.evaluate(engine.module, split, run.data, dist_env, run.trainer.seed)

    trainer = Trainer(engine, loader, run, dist_env, tracker, evaluate, grad_accum, global_batch)
    trainer.bad_steps = bad_steps
    final = trainer.fit(start_step)
    report = loader.report
    if trainer.stopped_by is not None:
        return _stopped(trainer, tracker, run, dist_env, report)
    tracker.log({"data/skipped_samples": float(len(report.skipped_samples)),
                 "data/unreadable_shards": float(len(report.unreadable_shards))}, run.trainer.max_steps)
    tracker.finish()
    summary = [f"vlforge: done at step {run.trainer.max_steps} | run dir {run_dir.resolve()}",
               f"  metrics: {run_dir.resolve() / 'metrics.jsonl'}"]
    summary += [f"  {k} = {v:.4f}" for k, v in sorted(final.items())]
    print(("\n".join(summary) + "\n") if dist_env.is_main else "", end="", flush=True)
    # Every rank reports its own data problems: each read different shards.
    print(f"vlforge: rank {dist_env.rank} data: {report.summary()}", flush=True)
    return final
