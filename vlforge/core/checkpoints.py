"""What a checkpoint directory is, for everyone who reads one: `checkpoints/step_N/` (exactly that name)
counts once rank 0 has written `complete.json` in it. A save is written under `step_N.partial/` and
renamed to `step_N/` once complete; an old checkpoint is renamed to `step_N.deleting/` before it is
removed. So a directory by the final name is whole or absent, whenever a process was killed.
`resolve_checkpoint` finds the newest complete one of a run, and
`consolidated_state_dict` joins its model weights into one fp32 state dict, whatever ZeRO stage and
world size wrote it. Writing checkpoints is the trainer's (vlforge.trainer.checkpoint)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from vlforge.core.distributed import default_ds_accelerator
from vlforge.core.errors import CheckpointError

COMPLETE = "complete.json"
_TAG = re.compile(r"step_\d{8}")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    """A checkpoint directory by its final name with its completion marker in it."""
    return _TAG.fullmatch(path.name) is not None and (path / COMPLETE).is_file()


def complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    found = []
    for path in ckpt_dir.glob("step_*"):
        if is_complete(path):
            found.append((json.loads((path / COMPLETE).read_text())["step"], path))
    return sorted(found)


def resolve_checkpoint(path: str | Path) -> Path:
    """A `checkpoints/step_N` directory as given, or the newest complete one of a run directory (or of
    its `checkpoints/`)."""
    path = Path(path)
    if is_complete(path):
        return path
    for ckpt_dir in (path / "checkpoints", path):
        found = complete_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
        if found:
            return found[-1][1]
    if path.is_dir() and path.name.startswith("step_"):
        raise CheckpointError(f"checkpoint {path} is incomplete: a save or removal was interrupted (a complete "
                              f"checkpoint is named step_<8 digits> and holds {COMPLETE})")
    raise CheckpointError(f"no complete checkpoint at {path} (expected a checkpoints/step_N directory or a run directory)")


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state (parameters, frozen ones included, and persistent buffers)."""
    if any(step_dir.glob("zero_pp_rank_*_optim_states.pt")):
        default_ds_accelerator()  # outside a launcher (export, load_model) on a machine without CUDA
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,
        )

        # ZeRO-1/2/3: the fp32 master partitions of every rank, joined.
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name))
    model_files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise CheckpointError(f"{step_dir} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
    # Without ZeRO every rank held the whole model, in the training dtype.
    state = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
