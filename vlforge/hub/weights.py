"""`trainer.init_from`: a model started from other weights before training."""
from __future__ import annotations

from torch import nn

from vlforge.core.state_dict import (
    LoadReport,
    load_into_model,
    read_weights,
    resolve_converter,
)
from vlforge.models.towers.pos_embed import fit_position_embeddings


def init_weights(module: nn.Module, init_from: str, converter: str | None = None, partial: bool = False) -> tuple[int, LoadReport]:
    """Start `module` from other weights (`trainer.init_from`); returns (weights loaded, what was left
    aside). `partial` (`trainer.init_partial`) lets model weights the checkpoint lacks or shapes
    differently keep their initialisation. ViT position embeddings of another image size are resampled
to the model's grid."""
    state = read_weights(init_from)
    if converter:
        state = resolve_converter(converter)(state)
    state = fit_position_embeddings(state, module)
    report = load_into_model(module, state, allow_unexpected=True, partial=partial)
    return len(state) - len(report.unexpected) - len(report.mismatched), report
