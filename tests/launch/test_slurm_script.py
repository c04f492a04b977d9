"""The sbatch generator: what a 4-node x 8-GPU job looks like, and the checked-in script is its template."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlforge.launch.slurm import SlurmJob, main, render

REPO = Path(__file__).resolve().parents[2]


def test_four_nodes_of_eight_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nodes", "4", "--gpus-per-node", "8", "--python", "python", "recipe=blip_caption", "optim.lr=2e-5",
                 "name=it's mine"]) == 0
    script = capsys.readouterr().out
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=vlforge-blip_caption", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=8", "#SBATCH --time=24:00:00",
        "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
        "#SBATCH --output=runs/slurm/%x-%j.out",
    ]
    assert script.rstrip().endswith("srun --kill-on-bad-exit=1 --cpu-bind=none python -m vlforge.cli train "
                                     "recipe=blip_caption optim.lr=2e-5 'name=it'\"'\"'s mine' trainer.resume=auto")
    assert "MASTER_" not in script  # the rendezvous is worked out in one place: prepare_launch_env
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell


def test_cpu_nodes_and_options() -> None:
    script = render(SlurmJob(nodes=2, gpus_per_node=0, tasks_per_node=1, partition="debug", account="vl",
                             signal_seconds=300, overrides=["recipe=clip_demo"]))
    assert "--gpus-per-node" not in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --partition=debug" in script and "#SBATCH --account=vl" in script
    assert "#SBATCH --signal=USR1@300" in script


def test_checked_in_script_is_the_template() -> None:
    # sbatch passes its extra arguments to the script: `vlforge train` receives them as "$@".
    assert (REPO / "launch" / "slurm" / "train.sbatch").read_text() == render(SlurmJob(python="python"))


def test_bad_requests_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nodes", "0", "recipe=clip_demo"]) == 2
    assert "--nodes must be >= 1" in capsys.readouterr().err
    assert main(["trainer.max_steps=10"]) == 2
    assert "recipe=<name>" in capsys.readouterr().err


def test_submit_without_slurm_reports_it(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "vlforge.launch.slurm", "--submit", "--output-dir", str(tmp_path),
                           "recipe=clip_demo"], capture_output=True, text=True, env={"PATH": "/nonexistent"})
    assert done.returncode == 2 and "error: sbatch not found" in done.stderr
    assert (tmp_path / "vlforge-clip_demo.sbatch").is_file()


def test_readme_shows_what_the_generator_prints(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--nodes", "4", "--gpus-per-node", "8", "--python", "/path/to/.venv/bin/python", "recipe=blip_caption"])
    shown = (REPO / "README.md").read_text().split("```bash\n#!/bin/bash\n", 1)[1].split("```", 1)[0]
    assert "#!/bin/bash\n" + shown == capsys.readouterr().out
