"""A model built with its parameters on the meta device and given a checkpoint's tensors: the values
are the checkpoint's, shared weights stay shared, computed buffers stay real, and anything left without
a value is named. Weights read in a lower precision are cast as they are read."""
from __future__ import annotations

import tracemalloc

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vlforge.core.errors import CheckpointError
from vlforge.core.state_dict import (
    check_materialised,
    load_into_model,
    parameters_on_meta,
    read_weights,
    retie,
    tied_parameters,
)


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


def test_weights_read_in_a_dtype_are_cast_one_tensor_at_a_time(tmp_path) -> None:
    torch.manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(100, 1000) for i in range(8)}  # 400 kB each
    state.update({"b.weight": torch.randn(5) * 1e-3, "b.ids": torch.arange(7), "c.mask": torch.tensor([True, False]),
                  "empty": torch.zeros(0, 3), "empty_ids": torch.zeros(0, dtype=torch.int64),
                  "half": torch.randn(3).half()})
    save_file(state, tmp_path / "w.safetensors", metadata={"format": "pt"})  # as an export writes it
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pth"):
        tracemalloc.start()
        read = read_weights(path, torch.bfloat16)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert list(read) == sorted(state) if path.suffix == ".safetensors" else read.keys() == state.keys()
        assert {k: v.dtype for k, v in read.items() if not v.is_floating_point()} == {
            "b.ids": torch.int64, "c.mask": torch.bool, "empty_ids": torch.int64}
        assert all(v.dtype == torch.bfloat16 for v in read.values() if v.is_floating_point())
        for key, value in state.items():  # the stored values, rounded
            assert read[key].shape == value.shape and torch.equal(read[key], value.to(read[key].dtype)), (path, key)
        if path.suffix == ".safetensors":
            # The file is read a tensor at a time: at most one float32 tensor (400 kB) was held, not all 3.2 MB.
            assert peak < 600_000, peak
    assert read_weights(tmp_path / "w.safetensors")["layer0.weight"].dtype == torch.float32


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-10], r"tensor 'layer7.weight' \(F32 \[4, 4\]\) claims bytes \[448, 512\) of the 502 "
                              r"the file holds, 64 needed"),
    (lambda data: (10**9).to_bytes(8, "little") + data[8:], "header length 1000000000 does not fit"),
    (lambda data: data[:8] + b"[" + data[9:], "not a safetensors file"),
    (lambda data: data.replace(b'"F32"', b'"F99"', 1), "has dtype 'F99', which vlforge does not read"),
])
def test_a_damaged_safetensors_file_is_named(tmp_path, damage, message) -> None:
    save_file({f"layer{i}.weight": torch.ones(4, 4) for i in range(8)}, tmp_path / "w.safetensors")
    path = tmp_path / "w.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as err:
        read_weights(path, torch.bfloat16)
    assert str(path) in str(err.value)
