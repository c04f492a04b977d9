"""A run directory that holds a run is continued, replaced, or refused with a message."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlforge.core.errors import ConfigError
from vlforge.trainer.run_dir import claim_run_dir, previous_run


def _old_run(run_dir: Path, step: int = 20) -> Path:
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "complete.json").write_text(json.dumps({"step": step}))
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "wandb_id.txt").write_text("abc123")
    (run_dir / "config.yaml").write_text("name: old\n")
    for kept in (".hydra", "logs"):
        (run_dir / kept).mkdir()
        (run_dir / kept / "file").write_text("kept")
    return run_dir


def test_a_fresh_directory_or_one_with_only_hydras_record_holds_no_run(tmp_path: Path) -> None:
    assert previous_run(tmp_path / "missing") == []
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "logs").mkdir()
    assert previous_run(tmp_path) == []
    claim_run_dir(tmp_path, resume=None, overwrite=False, is_main=True)


def test_training_again_into_a_run_is_refused_with_the_ways_out(tmp_path: Path) -> None:
    run_dir = _old_run(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        claim_run_dir(run_dir, resume=None, overwrite=False, is_main=True)
    message = str(info.value)
    assert f"run directory {run_dir.resolve()} already holds a run (checkpoints up to step 20, metrics.jsonl, wandb_id.txt)" in message
    assert "trainer.resume=auto" in message and "name=" in message and "trainer.overwrite=true" in message
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_an_interrupted_checkpoint_alone_counts_as_a_run(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step_00000010.partial").mkdir(parents=True)
    assert previous_run(tmp_path) == ["an interrupted checkpoint"]


def test_resume_continues_and_leaves_everything(tmp_path: Path) -> None:
    run_dir = _old_run(tmp_path / "run")
    claim_run_dir(run_dir, resume="auto", overwrite=False, is_main=True)
    assert (run_dir / "wandb_id.txt").read_text() == "abc123"
    assert previous_run(run_dir) == ["checkpoints up to step 20", "metrics.jsonl", "wandb_id.txt"]


def test_overwrite_deletes_the_run_but_hydras_record_and_the_logs(tmp_path: Path) -> None:
    run_dir = _old_run(tmp_path / "run")
    claim_run_dir(run_dir, resume=None, overwrite=True, is_main=False)
    assert previous_run(run_dir) != []  # only rank 0 deletes
    claim_run_dir(run_dir, resume=None, overwrite=True, is_main=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "logs"]
    assert (run_dir / "logs" / "file").read_text() == "kept"


def test_overwrite_and_resume_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trainer.overwrite=true starts .* and trainer.resume=auto continues it"):
        claim_run_dir(_old_run(tmp_path / "run"), resume="auto", overwrite=True, is_main=True)
