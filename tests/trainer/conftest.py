"""Fixtures of the trainer's unit tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def cpu_recipe_env(tmp_path, monkeypatch) -> None:
    """Recipes resolve their data directory under tmp_path; CUDA reads as absent, so precision 'auto'
    and pin_memory give the same answers on a GPU machine."""
    monkeypatch.setenv("VLFORGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
