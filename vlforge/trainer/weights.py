"""A checkpoint's model weights as one full state dict, and loading such a dict into a (possibly
ZeRO-3 partitioned) model: what evaluation and export need, whatever stage and world size trained it."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlforge.trainer.checkpoint import COMPLETE, CheckpointError, complete_checkpoints


def resolve_checkpoint(path: str | Path) -> Path:
    """A `checkpoints/step_N` directory as given, or the newest complete one of a run directory (or of
    its `checkpoints/`)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    for ckpt_dir in (path / "checkpoints", path):
        found = complete_checkpoints(ckpt_dir) if ckpt_dir.is_dir() else []
        if found:
            return found[-1][1]
    if path.is_dir() and path.name.startswith("step_"):
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE}): a save was interrupted")
    raise CheckpointError(f"no complete checkpoint at {path} (expected a checkpoints/step_N directory or a run directory)")


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state (parameters, frozen ones included, and persistent buffers)."""
    if any(step_dir.glob("zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # ZeRO-1/2/3: the fp32 master partitions of every rank, joined.
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name))
    model_files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if not model_files:
        raise CheckpointError(f"{step_dir} holds no DeepSpeed model states (mp_rank_*_model_states.pt)")
    # Without ZeRO every rank held the whole model, in the training dtype.
    state = torch.load(model_files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_full_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full state dict strictly (a missing or unexpected key is an error naming it). Under
    ZeRO-3 the partitions are gathered, overwritten with rank 0's values and partitioned again."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            result = module.load_state_dict(state_dict, strict=False)
    else:
        result = module.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"checkpoint does not fit the model: missing {result.missing_keys[:10]}, "
                              f"unexpected {result.unexpected_keys[:10]}")
