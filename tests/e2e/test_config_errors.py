"""Recipe mistakes fail fast, before any compute, and say what is wrong."""
from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import SMALL_DEMO, launch, python_cmd


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
