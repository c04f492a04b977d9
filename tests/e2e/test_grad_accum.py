"""Gradient accumulation: micro 4 x accum 1 and micro 2 x accum 2 reach the same parameters."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import TINY_REGRESSOR_RUN, check, launch, model_states, python_cmd
from tests.e2e.tiny_models import MeanColourRegressor


@pytest.mark.slow
def test_accumulation_matches_larger_micro_batch(e2e_env: dict[str, str], tmp_path: Path) -> None:
    common = [*TINY_REGRESSOR_RUN, "trainer.max_steps=5"]
    check(launch(python_cmd(*common, f"run_dir={tmp_path / 'a'}", "data.batch_size=4", "trainer.grad_accum=1"), e2e_env))
    check(launch(python_cmd(*common, f"run_dir={tmp_path / 'b'}", "data.batch_size=2", "trainer.grad_accum=2"), e2e_env))
    a, b = model_states(tmp_path / "a", 5), model_states(tmp_path / "b", 5)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=f"{name} differs")
    # The comparison means something only if training moved the weights (the run seeds 42 first).
    torch.manual_seed(42)
    fresh = MeanColourRegressor().state_dict()
    assert any(not torch.allclose(fresh[n], a[n], atol=1e-3) for n in fresh)
