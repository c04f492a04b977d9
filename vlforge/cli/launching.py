"""`vlforge train` and `vlforge eval`: one process runs the job right here, as `python launch/train.py`
does; `--nproc N` starts N processes under DeepSpeed's launcher, as `deepspeed --num_gpus N` does,
each running the job's entry script (vlforge/cli/<job>_entry.py, inside the package).

Everything that is not an option of the subcommand goes to Hydra in order: the overrides and Hydra's
own flags (`--cfg job`, `-m`, `--info`, ...).
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

from vlforge.cli import evaluate_entry, train_entry
from vlforge.cli.jobs import EVALUATE, TRAIN, Job
from vlforge.cli.usage import UsageError, unknown_name
from vlforge.config.recipes import available_recipes
from vlforge.core.console import VERBOSE_ENV
from vlforge.core.distributed import default_ds_accelerator


@dataclass(frozen=True)
class JobCommand:
    name: str  # the subcommand
    job: Job
    script: str  # the file each rank runs under a process launcher
    required: tuple[str, ...]  # overrides that must be given (the root config marks them mandatory)


COMMANDS = {
    "train": JobCommand("train", TRAIN, train_entry.__file__, ("recipe",)),
    "eval": JobCommand("eval", EVALUATE, evaluate_entry.__file__, ("recipe", "checkpoint")),
}

# Hydra flags that print something and exit without needing a complete config (`--cfg job` prints
# the config as composed, with any mandatory value still ???).
_INFO_FLAGS = {"--cfg", "-c", "--info", "-i", "--hydra-help", "--shell-completion", "-sc"}
_PLAIN_NAME = re.compile(r"^[\w.-]+$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `vlforge train|eval` themselves; the rest of the command line goes to Hydra."""
    parser.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                        help="processes (one per GPU) on this machine; N > 1 starts them with DeepSpeed's launcher "
                             "(default: 1, in this process)")
    parser.add_argument("--master-port", type=int, default=None, metavar="PORT",
                        help="rendezvous port of an --nproc job (default: DeepSpeed's, 29500); "
                             "give two jobs on one machine different ports")
    parser.add_argument("--verbose", action="store_true",
                        help="everything on the console: third-party warnings and DeepSpeed's build output "
                             "(VLFORGE_VERBOSE=1), the command that runs, full tracebacks (HYDRA_FULL_ERROR=1)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _override(overrides: list[str], key: str) -> str | None:
    """The value `overrides` give `key` (as key=, +key= or ++key=), the last one if several."""
    pattern = re.compile(rf"^\+{{0,2}}{re.escape(key)}=(.*)$")
    values = [m.group(1) for m in map(pattern.match, overrides) if m]
    return values[-1] if values else None


def check_overrides(command: JobCommand, overrides: list[str]) -> None:
    """Raise UsageError for a job that cannot start: a mandatory override missing, or a recipe name that
    recipes/recipe/ does not have. Informational Hydra flags and extra search paths are left to Hydra."""
    if any(arg.split("=", 1)[0] in _INFO_FLAGS for arg in overrides):
        return
    for key in command.required:
        if _override(overrides, key) is None:
            example = {"recipe": "recipe=<name> (`vlforge recipes` lists them)",
                       "checkpoint": "checkpoint=<run dir or checkpoints/step_N dir>, or checkpoint=null for the "
                                     "recipe's starting weights"}[key]
            raise UsageError(f"name the {key}: {example}")
    recipe = _override(overrides, "recipe")
    searchpath = any("hydra.searchpath" in arg for arg in overrides)  # recipes from elsewhere too
    # A sweep (recipe=a,b under -m) or any other override grammar is Hydra's to check.
    if recipe and _PLAIN_NAME.match(recipe) and not searchpath and recipe not in available_recipes():
        raise unknown_name("recipe", recipe, available_recipes(), "vlforge recipes")


def deepspeed_command(command: JobCommand, nproc: int, overrides: list[str],
                      master_port: int | None = None, verbose: bool = False) -> list[str]:
    """The DeepSpeed launcher's command line starting `nproc` ranks of `command`'s entry script; its own
    INFO lines (the world layout, each rank's command) only with `verbose`."""
    port = ["--master_port", str(master_port)] if master_port is not None else []
    quiet = [] if verbose else ["--log_level", "error"]
    return [sys.executable, "-m", "deepspeed.launcher.runner", *quiet, "--num_gpus", str(nproc), *port,
            command.script, *overrides]


def run_job(command: JobCommand, args: argparse.Namespace, overrides: list[str], prog: str) -> int:
    """Run `vlforge train|eval` with `overrides`; return its exit code."""
    check_overrides(command, overrides)
    if args.verbose:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # inherited by the ranks
        os.environ[VERBOSE_ENV] = "1"
    if args.nproc > 1:
        cmd = deepspeed_command(command, args.nproc, overrides, args.master_port, args.verbose)
        # Chosen here, before the launcher imports DeepSpeed, so that it does not warn that it guessed.
        default_ds_accelerator()
        if args.verbose:
            print(f"vlforge: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        return run_child(cmd)
    if args.verbose:
        print(f"vlforge: {command.name} in this process: {shlex.join(overrides)}", file=sys.stderr, flush=True)
    return _run_in_process(command.job, [f"{prog} {command.name}", *overrides])


def _run_in_process(job: Job, argv: list[str]) -> int:
    # launch() and Hydra read the command line from sys.argv (argv[0] names the program in Hydra's usage line).
    saved = sys.argv
    sys.argv = argv
    try:
        job.run()
    except SystemExit as exit_:  # Hydra reports a failed job and exits with 1
        return exit_code(exit_)
    finally:
        sys.argv = saved
    return 0


def exit_code(exit_: SystemExit) -> int:
    """The process exit status `exit_` stands for; a message given as the code goes to stderr, status 1."""
    if exit_.code is None or isinstance(exit_.code, int):
        return exit_.code or 0
    print(exit_.code, file=sys.stderr)
    return 1


def run_child(cmd: list[str]) -> int:
    """Run `cmd` to its end and return its exit status (128 + N for a child killed by signal N, as a shell
    reports it). Ctrl-C reaches the child too (same process group): it gets time to stop its ranks."""
    child = subprocess.Popen(cmd)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        try:
            code = child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
    return 128 - code if code < 0 else code

