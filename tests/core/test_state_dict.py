"""A model built with its parameters on the meta device and given a checkpoint's tensors: the values
are the checkpoint's, shared weights stay shared, computed buffers stay real, and anything left without
a value is named."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlforge.core.errors import CheckpointError
from vlforge.core.state_dict import check_materialised, load_into_model, parameters_on_meta, retie, tied_parameters


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 11)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.arange(4.0) + 1, persistent=False)  # computed, never saved

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids) * self.scale))


def test_a_model_built_on_meta_takes_the_checkpoints_tensors_and_stays_tied() -> None:
    torch.manual_seed(0)
    source = TiedLM()
    with torch.no_grad():
        source.norm.weight.add_(torch.randn(4))  # not the fresh LayerNorm a swap would hide behind
    state = {k: v.clone() for k, v in source.state_dict().items()}
    with parameters_on_meta():
        model = TiedLM()
    assert all(p.device.type == "meta" for p in model.parameters())
    assert torch.equal(model.scale, torch.tensor([1.0, 2.0, 3.0, 4.0]))  # buffers are built for real
    groups = tied_parameters(model)
    assert groups == [["embed.weight", "head.weight"]]
    load_into_model(model, state, assign=True)
    retie(model, groups)
    check_materialised(model)
    assert model.head.weight is model.embed.weight
    assert model.norm.weight.data_ptr() == state["norm.weight"].data_ptr()  # no copy
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(model(ids), source(ids))
    # Training it moves both names at once, as the tie means.
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    assert torch.equal(model.head.weight, model.embed.weight)


def test_a_parameter_left_on_meta_is_named() -> None:
    with parameters_on_meta():
        model = TiedLM()
    state = {k: torch.zeros(v.shape) for k, v in TiedLM().state_dict().items() if k != "norm.bias"}
    load_into_model(model, state, assign=True, allow_missing=["norm.bias"])
    with pytest.raises(CheckpointError, match=r"no value for \['norm.bias'\] \(1\)"):
        check_materialised(model)


def test_outside_the_context_parameters_are_real_again() -> None:
    with parameters_on_meta():
        nn.Linear(2, 2)
    assert nn.Linear(2, 2).weight.device.type == "cpu"
    with parameters_on_meta(enabled=False):
        assert nn.Linear(2, 2).weight.device.type == "cpu"
