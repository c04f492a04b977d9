"""Recipe mistakes fail fast, before any compute, and say what is wrong."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import SMALL_DEMO, check, launch, python_cmd, read_metrics


def test_misspelled_override_names_the_key(e2e_env: dict[str, str], tmp_path: Path) -> None:
    result = launch(python_cmd("recipe=clip_demo", "trainer.max_stepz=200", f"run_dir={tmp_path}"), e2e_env, timeout=60)
    assert result.returncode != 0
    assert "trainer.max_stepz" in result.output
    assert result.seconds < 10, result.seconds


def test_wrong_type_names_the_key(e2e_env: dict[str, str], tmp_path: Path) -> None:
    result = launch(python_cmd("recipe=clip_demo", "trainer.max_steps=lots", f"run_dir={tmp_path}"), e2e_env, timeout=60)
    assert result.returncode != 0
    assert "trainer.max_steps" in result.output and "lots" in result.output
    assert result.seconds < 10, result.seconds


def test_unknown_recipe_lists_the_available_ones(e2e_env: dict[str, str], tmp_path: Path) -> None:
    result = launch(python_cmd("recipe=clip_dmeo", f"run_dir={tmp_path}"), e2e_env, timeout=60)
    assert result.returncode != 0
    assert "recipe/clip_dmeo" in result.output
    assert "Available options in 'recipe'" in result.output and "clip_demo" in result.output


def test_print_composed_config(e2e_env: dict[str, str]) -> None:
    result = launch(python_cmd("recipe=clip_demo", "optim.lr=3e-4", "deepspeed=zero2", "--cfg", "job"), e2e_env, timeout=60)
    assert result.returncode == 0, result.output
    assert "lr: 0.0003" in result.output and "stage: 2" in result.output


def test_tower_dtype_with_a_low_precision_run_names_both_keys(e2e_env: dict[str, str], tmp_path: Path) -> None:
    result = launch(python_cmd("recipe=clip_demo", "+model.vision.dtype=bf16", "trainer.precision=bf16",
                               f"run_dir={tmp_path}"), e2e_env, timeout=60)
    assert result.returncode != 0
    assert "model.vision.dtype=bf16" in result.output and "trainer.precision=fp32" in result.output


def test_a_finetune_without_its_starting_weights_names_the_key(e2e_env: dict[str, str], tmp_path: Path) -> None:
    # The VQA and retrieval demos start from runs/clip_demo; without it the error says which key and path.
    result = launch(python_cmd("recipe=blip_vqa_demo", *SMALL_DEMO, f"trainer.init_from={tmp_path}/clip_demo",
                               f"run_dir={tmp_path}/run"), e2e_env, timeout=120)
    assert result.returncode != 0
    assert f"trainer.init_from={tmp_path}/clip_demo: no weights at {tmp_path}/clip_demo" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


# One mistake of each class, each refused before data is prepared or a model built (a fresh data dir
# stays empty), the key named.
@pytest.mark.parametrize("overrides, named", [
    (["trainer.keep_last=0"], "trainer.keep_last must be >= 1, got 0"),
    (["data.batch_size=16", "trainer.global_batch_size=100"], "trainer.global_batch_size=100"),
    (["model._target_=vlforge.models.clip.nothing.CLIP"],
     "model._target_=vlforge.models.clip.nothing.CLIP: cannot be imported"),
    (["trainer.init_converter=vlforge.models.blip.convert:no_such_converter"],
     "trainer.init_converter=vlforge.models.blip.convert:no_such_converter: cannot be imported"),
    (["trainer.resume=/nonexistent/step_00000010"], "trainer.resume=/nonexistent/step_00000010: no such checkpoint"),
    (["trainer.init_from=/nonexistent/weights.pth"], "trainer.init_from=/nonexistent/weights.pth: no weights at"),
], ids=["out of range", "batch sizes", "unknown target", "unknown converter", "missing checkpoint", "missing weights"])
def test_each_class_of_mistake_is_refused_before_any_compute(e2e_env: dict[str, str], tmp_path: Path,
                                                              overrides: list[str], named: str) -> None:
    data_dir = tmp_path / "data"
    result = launch(python_cmd("recipe=clip_demo", *overrides, f"run_dir={tmp_path}/run"),
                    {**e2e_env, "VLFORGE_DATA_DIR": str(data_dir)}, timeout=120)
    assert result.returncode != 0
    assert named in result.output, result.output[-2000:]
    assert not data_dir.exists() or not any(data_dir.iterdir())
    assert result.seconds < 15, result.seconds


def test_a_run_directory_holding_a_run_is_continued_replaced_or_refused(e2e_env: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["recipe=clip_demo", *SMALL_DEMO, f"run_dir={run_dir}", "data.batch_size=8", "trainer.max_steps=2",
            "trainer.log_every=1", "trainer.eval_at_end=false", "trainer.save_at_end=true"]
    check(launch(python_cmd(*args), e2e_env))
    metrics = (run_dir / "metrics.jsonl").read_bytes()

    again = launch(python_cmd(*args), e2e_env, timeout=120)
    assert again.returncode != 0
    assert (f"run directory {run_dir} already holds a run (checkpoints up to step 2, metrics.jsonl): add "
            "trainer.resume=auto to continue it") in again.output, again.output[-2000:]
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics

    check(launch(python_cmd(*args, "trainer.overwrite=true"), e2e_env))
    steps = [row["step"] for row in read_metrics(run_dir) if "train/loss" in row]
    assert steps == [1, 2]  # the new run's rows only, not appended to the old ones
