"""`vlforge train|eval`: what runs in this process, what the DeepSpeed launcher is asked to start, and which
requests are refused before anything starts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import vlforge.cli
from vlforge.cli import evaluate_entry, launching, train_entry
from vlforge.cli.jobs import EVALUATE, TRAIN, Job
from vlforge.cli.main import main
from vlforge.cli.usage import UsageError
from vlforge.core.console import VERBOSE_ENV

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """What would have run: ("in-process", sys.argv of the job) or ("child", command line); the job exits 5."""
    seen: list[tuple[str, list[str]]] = []

    def run(job: Job) -> None:
        seen.append(("in-process", [job.config_name, *sys.argv]))
        raise SystemExit(5)

    monkeypatch.setattr(Job, "run", run)
    monkeypatch.setattr(launching, "run_child", lambda cmd, env=None: seen.append(("child", cmd)) or 7)
    # --verbose sets these for the ranks; restored after each test so that none leaks into later ones
    # (an e2e run inheriting VLFORGE_VERBOSE=1 would print everything).
    for name in ("HYDRA_FULL_ERROR", VERBOSE_ENV):
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    return seen


def test_train_runs_in_this_process_with_hydras_arguments(started: list, monkeypatch: pytest.MonkeyPatch) -> None:
    argv_before = list(sys.argv)
    assert main(["train", "recipe=clip_demo", "--cfg", "job", "-p", "trainer", "optim.lr=1e-4"]) == 5
    assert started == [("in-process", ["train", "vlforge train", "recipe=clip_demo", "--cfg", "job", "-p", "trainer",
                                       "optim.lr=1e-4"])]
    assert sys.argv == argv_before  # restored


def test_eval_runs_the_evaluate_job(started: list) -> None:
    assert main(["eval", "recipe=clip_demo", "checkpoint=runs/clip_demo", "splits=[val]"]) == 5
    assert started == [("in-process", ["evaluate", "vlforge eval", "recipe=clip_demo", "checkpoint=runs/clip_demo",
                                       "splits=[val]"])]


def test_nproc_starts_the_deepspeed_launcher_on_the_packaged_entry_script(started: list) -> None:
    # The command's own options may come anywhere among Hydra's arguments, which keep their order.
    assert main(["train", "recipe=clip_demo", "--nproc", "2", "trainer.max_steps=3", "--master-port", "29123",
                 "--cfg", "job"]) == 7  # the launcher's exit status
    script = str(Path(vlforge.cli.__file__).with_name("train_entry.py"))
    assert started == [("child", [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "error",
                                  "--num_gpus", "2",
                                  "--master_port", "29123", script, "recipe=clip_demo", "trainer.max_steps=3",
                                  "--cfg", "job"])]
    started.clear()
    assert main(["eval", "--nproc=4", "recipe=clip_demo", "checkpoint=null"]) == 7
    assert started[0][1][6:] == ["4", str(Path(evaluate_entry.__file__)), "recipe=clip_demo", "checkpoint=null"]
    assert Path(train_entry.__file__).is_file() and Path(evaluate_entry.__file__).is_file()


def test_verbose_shows_the_command_and_asks_hydra_for_full_errors(started: list,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--verbose", "--nproc", "2", "recipe=clip_demo"]) == 7
    assert os.environ["HYDRA_FULL_ERROR"] == "1" and os.environ[VERBOSE_ENV] == "1"
    assert capsys.readouterr().err.startswith(f"vlforge: {sys.executable} -m deepspeed.launcher.runner --num_gpus 2 ")


@pytest.mark.parametrize("argv, message", [
    (["train", "trainer.max_steps=3"], "name the recipe: recipe=<name>"),
    (["train", "recipe=clip_dmo"], "unknown recipe 'clip_dmo'; did you mean clip_demo?"),
    (["eval", "recipe=clip_demo"], "name the checkpoint: checkpoint=<run dir or checkpoints/step_N dir>"),
    (["eval", "checkpoint=runs/x"], "name the recipe"),
])
def test_requests_that_cannot_start_are_usage_errors(argv: list[str], message: str, started: list,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"usage: vlforge {argv[0]} [-h] [--nproc N]" in err and message in err, err
    assert started == []


@pytest.mark.parametrize("overrides", [
    ["recipe=clip_demo", "--cfg", "job"],
    ["--hydra-help"],  # Hydra's own help needs no recipe
    ["--cfg", "job", "trainer.max_steps=3"],  # prints the config with recipe ???
    ["-m", "recipe=clip_demo,siglip_demo"],  # a sweep: Hydra's to expand
    ["+recipe=clip_demo"],
    ["recipe=my_recipe", "hydra.searchpath=[file:///somewhere/recipes]"],  # a recipe from another tree
])
def test_what_is_left_to_hydra(overrides: list[str]) -> None:
    launching.check_overrides(launching.COMMANDS["train"], overrides)


def test_unknown_recipe_lists_close_names() -> None:
    with pytest.raises(UsageError, match=r"unknown recipe 'blip_captoin'; did you mean one of blip_caption, "):
        launching.check_overrides(launching.COMMANDS["train"], ["recipe=blip_captoin"])


def test_jobs_are_those_of_the_launch_scripts() -> None:
    assert (TRAIN.config_name, TRAIN.entry) == ("train", "vlforge.trainer.run:train")
    assert (EVALUATE.config_name, EVALUATE.entry) == ("evaluate", "vlforge.trainer.evaluate:evaluate")
    assert "TRAIN.run()" in (REPO / "launch" / "train.py").read_text()
    assert "EVALUATE.run()" in (REPO / "launch" / "evaluate.py").read_text()


def test_exit_statuses() -> None:
    assert launching.exit_code(SystemExit()) == 0 and launching.exit_code(SystemExit(3)) == 3
    assert launching.exit_code(SystemExit("message")) == 1
    assert launching.run_child([sys.executable, "-c", "import sys; sys.exit(4)"]) == 4
    assert launching.run_child([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]) \
        == 128 + 15


def test_entry_script_runs_as_a_file_as_the_deepspeed_launcher_runs_it(tmp_path: Path) -> None:
    # `python <file> --local_rank=0 ...` from another directory: the deepspeed launcher's child command.
    done = subprocess.run([sys.executable, "-u", train_entry.__file__, "--local_rank=0", "recipe=clip_demo",
                           "trainer.max_steps=9", "--cfg", "job", "--package", "trainer"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert yaml.safe_load(done.stdout.split("\n", 1)[1])["max_steps"] == 9  # after the `# @package` line
    assert list(tmp_path.iterdir()) == []  # --cfg job composes and prints; nothing runs
