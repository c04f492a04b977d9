"""An sbatch script for a recipe on N nodes: one srun task per GPU, preemption-safe.

    vlforge slurm --nodes 4 --gpus-per-node 8 recipe=blip_caption optim.lr=2e-5
    vlforge slurm --nodes 4 --gpus-per-node 8 --submit recipe=blip_caption

(or `python -m vlforge.launch.slurm ...`, the same).

Prints the script, or with --submit writes it to runs/slurm/<job name>.sbatch and submits it. The
job asks for SIGUSR1 two minutes before its time limit; every rank then finishes its step, a
checkpoint is saved and the job requeues itself, resuming from it (trainer.resume=auto).
Each task runs `python -m vlforge.cli train` (the `vlforge train` command, with --python's
interpreter). launch/slurm/train.sbatch is the same script with the recipe left to sbatch's arguments.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SlurmJob:
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # default: one per GPU (one per node without GPUs)
    cpus_per_task: int = 8
    time: str = "24:00:00"
    job_name: str | None = None  # default: vlforge-<recipe>
    partition: str | None = None
    account: str | None = None
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit
    output_dir: str = "runs/slurm"
    python: str = "python"
    overrides: list[str] = field(default_factory=list)  # Hydra arguments of `vlforge train`; [] -> "$@"

    def validate(self) -> None:
        for name in ("nodes", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or (self.tasks_per_node is not None and self.tasks_per_node < 1):
            raise ValueError("--gpus-per-node must be >= 0 and --tasks-per-node >= 1")
        if self.overrides and not any(o.startswith("recipe=") for o in self.overrides):
            raise ValueError("name the recipe: recipe=<name> among the overrides")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def name(self) -> str:
        if self.job_name:
            return self.job_name
        recipe = next((o.split("=", 1)[1] for o in self.overrides if o.startswith("recipe=")), None)
        return f"vlforge-{recipe}" if recipe else "vlforge"


def render(job: SlurmJob) -> str:
    """The sbatch script for `job`."""
    job.validate()
    directives = [
        f"--job-name={job.name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.tasks}",
        *([f"--gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []),
        f"--cpus-per-task={job.cpus_per_task}",
        f"--time={job.time}",
        *([f"--partition={job.partition}"] if job.partition else []),
        *([f"--account={job.account}"] if job.account else []),
        # SIGUSR1 reaches every task of the job's steps (not the batch shell): the trainer saves and requeues.
        f"--signal=USR1@{job.signal_seconds}",
        "--requeue",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--output={job.output_dir}/%x-%j.out",
    ]
    arguments = " ".join(shlex.quote(o) for o in job.overrides) if job.overrides else '"$@"'
    usage = [] if job.overrides else [
        "# Usage (flags given to sbatch override the #SBATCH lines; the arguments go to `vlforge train`):",
        "#   mkdir -p runs/slurm",
        "#   sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 launch/slurm/train.sbatch recipe=blip_caption",
        "# `vlforge slurm` writes the same script with the numbers and the recipe filled in."]
    lines = ["#!/bin/bash", *usage, *(f"#SBATCH {d}" for d in directives), "", "set -euo pipefail",
             'cd "${SLURM_SUBMIT_DIR:-.}"',
             'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"',
             'echo "vlforge: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
             "# One task per GPU. Each task reads its rank from SLURM_PROCID / SLURM_LOCALID, and the",
             "# rendezvous from the first node's NodeAddr and a port unique to the job and each requeue",
             "# (vlforge/core/distributed.py: prepare_launch_env).",
             f"srun --kill-on-bad-exit=1 --cpu-bind=none {shlex.quote(job.python)} -m vlforge.cli train {arguments} "
             "trainer.resume=auto", ""]
    return "\n".join(lines)


def _parse_args(argv: list[str] | None, prog: str) -> tuple[SlurmJob, bool]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    defaults = SlurmJob()
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--gpus-per-node", type=int, default=defaults.gpus_per_node, help="0 for CPU nodes")
    parser.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU")
    parser.add_argument("--cpus-per-task", type=int, default=defaults.cpus_per_task)
    parser.add_argument("--time", default=defaults.time, help="time limit, e.g. 24:00:00")
    parser.add_argument("--job-name", default=None, help="default: vlforge-<recipe>")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--signal-seconds", type=int, default=defaults.signal_seconds,
                        help="send SIGUSR1 this many seconds before the time limit (default: %(default)s)")
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where job logs go")
    parser.add_argument("--python", default=sys.executable, help="interpreter the tasks run (default: this one)")
    parser.add_argument("--submit", action="store_true", help="write the script under --output-dir and sbatch it")
    parser.add_argument("overrides", nargs="+", help="recipe=<name> and other Hydra overrides of `vlforge train`")
    args = parser.parse_args(argv)
    submit = args.submit
    del args.submit
    return SlurmJob(**vars(args)), submit


def main(argv: list[str] | None = None, prog: str = "python -m vlforge.launch.slurm") -> int:
    """Print the script for the command line `argv`, or write and submit it with --submit; return the exit
    status (2 for a request that cannot be rendered or submitted). `prog` names the command in its usage line."""
    job, submit = _parse_args(argv, prog)
    try:
        script = render(job)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not submit:
        print(script, end="")
        return 0
    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{job.name}.sbatch"
    path.write_text(script, encoding="utf-8")
    try:
        done = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        print(f"error: sbatch not found (is this a SLURM login node?); the script is at {path}", file=sys.stderr)
        return 2
    print((done.stdout + done.stderr).strip())
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
