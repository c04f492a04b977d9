"""The package as a user installs it: the wheel built from the checkout holds every recipe, and installed in
a fresh virtual environment outside the checkout its `vlforge` command lists the recipes, trains clip_demo
for 5 steps, evaluates the checkpoint on two ranks under the DeepSpeed launcher, and exports it."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import vlforge
from tests.e2e.conftest import free_port, read_metrics
from vlforge.config.recipes import available_recipes

REPO = Path(__file__).resolve().parents[2]
# What the wheel is built from: a copy, so that a stale build/ of the checkout cannot leak into it.
SOURCES = ("setup.py", "pyproject.toml", "README.md", "LICENSE", "vlforge", "recipes")
# The demo data cut down (two eval shards, one per rank), a jsonl logger instead of wandb.
SMALL = ["data.demo.num_train=128", "data.demo.num_val=32", "data.demo.num_test=32", "data.demo.samples_per_shard=16",
         "data.batch_size=16", "data.eval_batch_size=16", "data.num_workers=0", "logger=jsonl"]


@pytest.fixture
def master_port() -> Iterator[int]:
    """A free rendezvous port; afterwards, the buffer files DeepSpeed's CPU all-reduce leaves in /dev/shm
    for it, one per rank of about 66 MB, named by the port (tests/e2e/conftest.py has the full story)."""
    port = free_port()
    yield port
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        leftover.unlink(missing_ok=True)


def _run(cmd: list[str | Path], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, **kwargs)


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout[-5000:]
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist,
              src]))
    (built,) = dist.glob("vlforge-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with the wheel installed and this environment's packages for its dependencies."""
    root = tmp_path_factory.mktemp("venv")
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", root]))
    python = root / "bin" / "python"
    _ok(_run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel]))
    # torch, deepspeed & co. come from this environment rather than being downloaded again. A venv made
    # with --system-site-packages would see the base interpreter's packages, not this venv's; a .pth line
    # adds a directory to sys.path after the venv's own site-packages (its .pth files, among them the
    # checkout's editable install, are not read). Written after the install, so that pip saw no vlforge.
    purelib = _ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])).strip()
    (Path(purelib) / "shared_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root


@pytest.fixture(scope="module")
def env(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR", "VIRTUAL_ENV")}
    return {**environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
            "VLFORGE_DATA_DIR": str(tmp_path_factory.mktemp("data"))}


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_every_recipe(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {name.removeprefix("vlforge/recipes/") for name in names
               if name.startswith("vlforge/recipes/") and name.endswith(".yaml")}
    assert recipes == {str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes").rglob("*.yaml")}
    assert "hydra/launcher/vlforge_slurm.yaml" in recipes  # three levels down
    assert {"vlforge/py.typed", "vlforge/cli/train_entry.py", "vlforge/cli/evaluate_entry.py",
            "vlforge/cli/__main__.py"} <= names
    assert not any(name.startswith(("tests/", "launch/", "benchmarks/")) for name in names)
    info = f"vlforge-{vlforge.__version__}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"{info}/METADATA").decode()
        assert "vlforge = vlforge.cli.main:main" in archive.read(f"{info}/entry_points.txt").decode()
        assert "Copyright (c) 2026, the vlforge authors" in archive.read(f"{info}/licenses/LICENSE").decode()
    assert f"\nVersion: {vlforge.__version__}\n" in metadata and "\nLicense: BSD-3-Clause\n" in metadata
    assert "\nRequires-Dist: huggingface_hub" in metadata


@pytest.mark.slow
def test_installed_command_trains_evaluates_and_exports(venv: Path, env: dict[str, str], master_port: int,
                                                        tmp_path: Path) -> None:
    vlforge_cmd, work = venv / "bin" / "vlforge", tmp_path / "work"
    work.mkdir()

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return _run([vlforge_cmd, *args], cwd=work, env=env)

    # The package is the installed one, not the checkout, and its recipe tree reads as resources.
    code = ("import vlforge, vlforge.recipes.hydra.launcher; from importlib.resources import files; "
            "print(vlforge.__file__); print(files('vlforge.recipes.hydra.launcher').joinpath('vlforge_slurm.yaml')"
            ".is_file())")
    probe = _ok(_run([venv / "bin" / "python", "-c", code], cwd=work, env=env)).split()
    assert Path(probe[0]).is_relative_to(venv) and probe[1] == "True", probe
    assert _ok(run("--version")) == f"vlforge {vlforge.__version__}\n"
    assert [line.split()[0] for line in _ok(run("recipes")).splitlines()] == available_recipes()

    run_dir = tmp_path / "run"
    out = _ok(run("train", "recipe=clip_demo", *SMALL, "trainer.max_steps=5", "trainer.log_every=1",
                  "trainer.eval_every=0", f"run_dir={run_dir}"))
    assert "vlforge: done at step 5" in out
    done = json.loads((run_dir / "checkpoints" / "step_00000005" / "complete.json").read_text())
    assert done["step"] == 5 and done["world_size"] == 1
    rows = read_metrics(run_dir)
    assert sorted(row["step"] for row in rows if "train/loss" in row) == [1, 2, 3, 4, 5]
    trained = {k: v for row in rows if row["step"] == 5 for k, v in row.items() if k.startswith("val/")}
    assert "val/zeroshot_top1" in trained

    # Two ranks under the DeepSpeed launcher, each running the entry script inside the installed package.
    eval_dir = tmp_path / "eval"
    # --verbose: the launcher prints the command line of each rank (quiet by default).
    out = _ok(run("eval", "--verbose", "--nproc", "2", "--master-port", str(master_port), "recipe=clip_demo", *SMALL,
                  f"checkpoint={run_dir}", "splits=[val]", f"run_dir={eval_dir}"))
    assert f"{venv}/lib/" in out and "vlforge/cli/evaluate_entry.py" in out  # the launcher's command lines
    result = json.loads((eval_dir / "eval.json").read_text())
    assert result["step"] == 5 and result["world_size"] == 2
    assert result["checkpoint"] == str(run_dir / "checkpoints" / "step_00000005")
    assert result["metrics"] == pytest.approx(trained, abs=1e-5)  # as training's own one-rank evaluation

    exported = tmp_path / "exported"
    out = _ok(run("export", run_dir, exported))
    assert f"\nvlforge: exported step 5 of {run_dir}" in out, out[-3000:]
    assert (exported / "model.safetensors").stat().st_size > 1_000_000 and (exported / "config.yaml").is_file()
    assert list(work.iterdir()) == []  # every output went where it was asked to
