"""Building modules outside DeepSpeed's `zero.Init` (ZeRO-3 model construction) when they must be whole.

Models never import DeepSpeed themselves: the active context is looked up in sys.modules.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator


def zero_init_context() -> Any:
    """The active `deepspeed.zero.Init` context, or None (also when DeepSpeed was never imported)."""
    module = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    return getattr(module, "top_level_context", None) if module is not None else None


@contextlib.contextmanager
def outside_zero_init() -> Iterator[None]:
    """Build modules as plain (unpartitioned) ones even inside `zero.Init`.

    zero.Init converts every floating tensor created in it to its own dtype and partitions each
    module's parameters when the module's `__init__` returns, so a tower built there can neither keep
    another dtype nor load a checkpoint with `from_pretrained` / timm's loader (they write into empty
    placeholders). Built outside, the tower is whole on each rank until `deepspeed.initialize`, which
    partitions the parameters it finds unpartitioned, keeping their dtype, with rank 0's values
    broadcast to all ranks. DeepSpeed uses the same pair of calls around `deepspeed.initialize`."""
    if zero_init_context() is None:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import (
        restore_init_context,
        shutdown_init_context,
    )

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()
