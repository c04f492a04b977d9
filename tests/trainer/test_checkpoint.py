"""The save protocol on one process with a stand-in engine: what a directory holds after each save,
what resume picks among leftovers, and a full disk. Processes killed at each point of a real save are
tests/e2e/test_save_faults.py."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from vlforge.core.checkpoints import complete_checkpoints, resolve_checkpoint
from vlforge.core.distributed import DistEnv
from vlforge.core.errors import CheckpointError
from vlforge.trainer.checkpoint import resolve_resume, save_checkpoint
from vlforge.trainer.faults import FAIL_AT_SAVE_ENV

ONE_RANK = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1", master_port=29500,
                   launcher="python")


class FileEngine:
    """Writes what DeepSpeed's save_checkpoint writes that matters here: files under save_dir/tag."""

    def __init__(self, megabytes: float = 0.01) -> None:
        self.payload = bytes(int(megabytes * 2**20))
        self.saved_latest: list[bool] = []

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = True) -> None:
        self.saved_latest.append(save_latest)
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(self.payload)


def _save(ckpt_dir: Path, step: int, engine: FileEngine | None = None, keep_last: int = 2) -> Path:
    return save_checkpoint(engine or FileEngine(), ckpt_dir, step, {"step": step}, ONE_RANK, keep_last)


def test_a_save_is_renamed_into_place_with_its_marker_and_rank_file_and_moves_latest(tmp_path: Path) -> None:
    engine = FileEngine()
    path = _save(tmp_path, 10, engine)
    assert path == tmp_path / "step_00000010"
    assert sorted(p.name for p in path.iterdir()) == ["complete.json", "mp_rank_00_model_states.pt", "rank_00000.pt"]
    assert json.loads((path / "complete.json").read_text())["step"] == 10
    assert torch.load(path / "rank_00000.pt") == {"step": 10}
    assert (tmp_path / "latest").read_text() == "step_00000010"
    assert engine.saved_latest == [False]  # DeepSpeed's pointer would name the .partial directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000010"]


def test_keep_last_removes_the_oldest(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _save(tmp_path, step)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [20, 30]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000020", "step_00000030"]


def test_what_interrupted_saves_and_removals_leave_is_never_resumed_and_the_next_save_removes_it(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    # A newer save killed after its marker but before the rename, an unmarked partial, a half-removed
    # old checkpoint that still holds its marker, and an unmarked directory by the final name.
    for name, marked in (("step_00000040.partial", True), ("step_00000050.partial", False),
                         ("step_00000005.deleting", True), ("step_00000060", False)):
        (tmp_path / name).mkdir()
        if marked:
            (tmp_path / name / "complete.json").write_text(json.dumps({"step": 99}))
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000010"
    assert resolve_checkpoint(tmp_path) == tmp_path / "step_00000010"
    for name in ("step_00000040.partial", "step_00000005.deleting"):
        with pytest.raises(CheckpointError, match="incomplete: a save or removal was interrupted"):
            resolve_checkpoint(tmp_path / name)
        with pytest.raises(CheckpointError, match="not a complete checkpoint"):
            resolve_resume(str(tmp_path / name), tmp_path)

    _save(tmp_path, 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000010", "step_00000020"]


def test_a_killed_save_of_the_same_step_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / "step_00000010.partial"
    stale.mkdir(parents=True)
    (stale / "stale.pt").write_bytes(b"x")
    path = _save(tmp_path, 10)
    assert not (path / "stale.pt").exists() and not stale.exists()


def test_a_full_disk_leaves_the_previous_checkpoint_and_names_the_path_and_the_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FileEngine(megabytes=3)
    _save(tmp_path, 10, engine)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step_00000010").iterdir()}
    monkeypatch.setenv(FAIL_AT_SAVE_ENV, "20:enospc")
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path, 20, engine)
    message = str(info.value)
    assert "checkpoint of step 20: the disk is full" in message
    assert str(tmp_path.resolve()) in message
    assert "needs about 3.0 MiB" in message  # the size of the checkpoint already on disk
    assert f"the previous checkpoint {tmp_path / 'step_00000010'} is intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000010"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "step_00000010").iterdir()} == before
    assert (tmp_path / "latest").read_text() == "step_00000010"


def test_an_error_that_is_not_a_full_disk_is_raised_as_it_is(tmp_path: Path) -> None:
    class BrokenEngine(FileEngine):
        def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = True) -> None:
            raise RuntimeError("an unrelated failure")

    with pytest.raises(RuntimeError, match="an unrelated failure"):
        _save(tmp_path, 10, BrokenEngine())


def test_a_write_that_fails_with_room_left_is_reported_as_a_failed_write(tmp_path: Path) -> None:
    class FailingEngine(FileEngine):
        def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = True) -> None:
            super().save_checkpoint(save_dir, tag, client_state, save_latest)
            raise OSError(errno.EIO, "Input/output error", str(Path(save_dir) / tag / "mp_rank_00_model_states.pt"))

    with pytest.raises(CheckpointError, match=r"checkpoint of step 10: a write failed \(\[Errno 5\] Input/output error"):
        _save(tmp_path, 10, FailingEngine())
    assert list(tmp_path.iterdir()) == []


def test_a_malformed_fault_variable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAIL_AT_SAVE_ENV, "10:somewhere")
    with pytest.raises(ValueError, match="VLFORGE_FAIL_AT_SAVE=10:somewhere: expected STEP:POINT"):
        _save(tmp_path, 10)
