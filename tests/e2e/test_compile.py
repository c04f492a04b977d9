"""trainer.compile: the model's forward compiled by torch.compile trains to the weights the eager run
reaches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import TINY_REGRESSOR_RUN, check, launch, model_states, python_cmd, read_metrics, series


@pytest.mark.slow
def test_a_compiled_model_trains_as_the_eager_one(e2e_env: dict[str, str], tmp_path: Path) -> None:
    common = [*TINY_REGRESSOR_RUN, "trainer.max_steps=4", "data.batch_size=4"]
    check(launch(python_cmd(*common, f"run_dir={tmp_path / 'eager'}"), e2e_env))
    # graph_code: dynamo prints each graph it captures, the evidence that the forward was compiled.
    compiled = check(launch(python_cmd(*common, f"run_dir={tmp_path / 'compiled'}", "trainer.compile=true"),
                            {**e2e_env, "TORCH_LOGS": "graph_code"}))
    logs = compiled.output + "".join(p.read_text() for p in (tmp_path / "compiled" / "logs").glob("*.log"))
    assert "__compiled_fn" in logs
    eager, got = model_states(tmp_path / "eager", 4), model_states(tmp_path / "compiled", 4)
    assert eager.keys() == got.keys()
    for name in eager:
        torch.testing.assert_close(got[name], eager[name], rtol=0, atol=1e-5, msg=f"{name} differs")
    losses = series(read_metrics(tmp_path / "compiled"), "train/loss")
    assert losses == pytest.approx(series(read_metrics(tmp_path / "eager"), "train/loss"), rel=1e-5)
    assert len(losses) == 4 and losses[4] < losses[1]  # it trained
