"""The shared key mapping of the converters: renames, fused projections, BERT's LM head and the strict
load, each error naming the keys at fault."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlforge.models.layers.convert import (
    BERT_FUSED,
    BERT_RENAMES,
    bert_from_hf,
    bert_lm_head_from_hf,
    load_mapped,
    map_keys,
)


def _values(*shape: int, start: float = 0.0) -> torch.Tensor:
    return torch.arange(start, start + torch.Size(shape).numel()).reshape(shape)


def test_keys_are_renamed_and_projections_fused_in_order_under_the_prefix() -> None:
    checkpoint = {
        "other.embeddings.word_embeddings.weight": _values(3, 2),  # outside the prefix: left alone
        "text.embeddings.word_embeddings.weight": _values(5, 2),
        "text.embeddings.position_ids": torch.arange(4),  # ignored
        "text.pooler.dense.weight": _values(2, 2),  # ignored
        "text.encoder.layer.0.attention.self.value.weight": _values(2, 2, start=200),
        "text.encoder.layer.0.attention.self.query.weight": _values(2, 2),
        "text.encoder.layer.0.attention.self.key.weight": _values(2, 2, start=100),
        "text.encoder.layer.0.output.LayerNorm.bias": _values(2),
    }
    out = bert_from_hf(checkpoint, "text.")
    assert sorted(out) == ["layers.0.attention.query_key_value.weight", "layers.0.norm.bias", "word_embeddings.weight"]
    assert torch.equal(out["word_embeddings.weight"], _values(5, 2))
    fused = out["layers.0.attention.query_key_value.weight"]
    assert torch.equal(fused, torch.cat([_values(2, 2), _values(2, 2, start=100), _values(2, 2, start=200)]))


def test_a_missing_part_of_a_fused_projection_is_named() -> None:
    checkpoint = {"encoder.layer.3.attention.self.query.bias": _values(2),
                  "encoder.layer.3.attention.self.value.bias": _values(2)}
    with pytest.raises(KeyError) as info:
        map_keys(checkpoint, "", BERT_RENAMES, BERT_FUSED, (), "BERT")
    assert info.value.args[0] == ("checkpoint lacks ['encoder.layer.3.attention.self.key.bias'], parts of the fused "
                                  "'layers.3.attention.query_key_value.bias'")


def test_a_key_without_a_vlforge_name_is_named_with_the_checkpoint_kind() -> None:
    with pytest.raises(KeyError) as info:
        bert_from_hf({"bert.encoder.layer.0.surprise.weight": _values(2)}, "bert.")
    assert info.value.args[0] == "no vlforge name for BERT checkpoint key 'bert.encoder.layer.0.surprise.weight'"


def _lm_head(decoder: bool) -> dict[str, torch.Tensor]:
    head = {"cls.predictions.transform.dense.weight": _values(2, 2), "cls.predictions.transform.dense.bias": _values(2),
            "cls.predictions.transform.LayerNorm.weight": _values(2, start=10),
            "cls.predictions.transform.LayerNorm.bias": _values(2, start=20), "cls.predictions.bias": _values(5),
            "bert.embeddings.word_embeddings.weight": _values(5, 2, start=50)}
    if decoder:
        head["cls.predictions.decoder.weight"] = _values(5, 2, start=-50)
    return head


def test_lm_head_keys_map_and_a_tied_decoder_comes_from_the_word_embeddings() -> None:
    tied = "bert.embeddings.word_embeddings.weight"
    out = bert_lm_head_from_hf(_lm_head(decoder=False), tied_embedding_key=tied)
    assert sorted(out) == ["decoder.bias", "decoder.weight", "dense.bias", "dense.weight", "norm.bias", "norm.weight"]
    assert torch.equal(out["decoder.weight"], _values(5, 2, start=50)) and torch.equal(out["norm.bias"], _values(2, start=20))
    # A decoder weight in the file wins over the embeddings.
    assert torch.equal(bert_lm_head_from_hf(_lm_head(decoder=True), tied_embedding_key=tied)["decoder.weight"],
                       _values(5, 2, start=-50))
    with pytest.raises(KeyError) as info:
        bert_lm_head_from_hf(_lm_head(decoder=False))
    assert info.value.args[0] == "checkpoint lacks LM head keys ['cls.predictions.decoder.weight']"


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(2, 3)
        self.second = nn.Linear(3, 1, bias=False)


def test_load_mapped_loads_exactly_and_names_every_misfit() -> None:
    source = _Pair()
    target = _Pair()
    load_mapped(target, source.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))

    with pytest.raises(KeyError) as info:
        load_mapped(target, {**source.state_dict(), "third.weight": torch.zeros(1)})
    assert info.value.args[0] == "checkpoint does not fit _Pair: missing [], unexpected ['third.weight'], shape mismatches []"
    bad = {**source.state_dict(), "second.weight": torch.zeros(2, 3)}
    del bad["first.bias"]
    with pytest.raises(KeyError) as info:
        load_mapped(target, bad)
    assert info.value.args[0] == ("checkpoint does not fit _Pair: missing ['first.bias'], unexpected [], "
                                  "shape mismatches ['second.weight: checkpoint (2, 3) vs model (1, 3)']")
    # Keys under an ignored prefix may be absent; everything else still loads.
    partial = {k: v + 1 for k, v in source.state_dict().items() if not k.startswith("second.")}
    load_mapped(target, partial, ignore=("second.",))
    assert torch.equal(target.first.weight, source.first.weight + 1)
