"""The model zoo: a table from (name, model type) to the recipe that builds the model and where its
weights come from. Data, not registration: each family lists its rows in models/<family>/zoo.py and
they are joined here, in this order, and nowhere else.

Names and types follow LAVIS where they overlap. A `demo` type is the run a `_demo` recipe leaves in
`runs/` (train it first); the others name published weights, fetched once into the Hugging Face cache
(LAVIS's single files into `$VLFORGE_HOME`) or read from any local directory given as `checkpoint=`.
"""
from __future__ import annotations

from vlforge.models.albef import zoo as albef
from vlforge.models.blip import zoo as blip
from vlforge.models.blip2 import zoo as blip2
from vlforge.models.clip import zoo as clip
from vlforge.models.llava import zoo as llava
from vlforge.models.siglip import zoo as siglip
from vlforge.models.zoo_entry import ZooEntry

ENTRIES: tuple[ZooEntry, ...] = (*blip.ZOO, *albef.ZOO, *blip2.ZOO, *clip.ZOO, *siglip.ZOO, *llava.ZOO)


def find_entry(name: str, model_type: str, source: str | None = None) -> ZooEntry:
    """The row of `name`/`model_type`: of origin `source` ("hf", "lavis", ...) when given, else the
    first listed (a family lists its default release first)."""
    rows = [e for e in ENTRIES if e.name == name and e.model_type == model_type]
    for entry in rows:
        if source is None or entry.origin == source:
            return entry
    if rows:
        origins = ", ".join(dict.fromkeys(e.origin for e in rows))
        raise ValueError(f"model '{name}' type '{model_type}' has no source '{source}'; its sources: {origins}")
    types = list(dict.fromkeys(e.model_type for e in ENTRIES if e.name == name))
    if types:
        raise ValueError(f"model '{name}' has no type '{model_type}'; its types: {', '.join(types)}")
    names = sorted({e.name for e in ENTRIES})
    raise ValueError(f"unknown model '{name}'; the zoo has: {', '.join(names)}")


def format_table(rows: list[tuple[str, ...]]) -> str:
    """`rows` (the first is the header) in aligned columns, a rule under the header; the last column is
    left unpadded (descriptions)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


class ModelZoo:
    """`print(model_zoo)`: the table of names, types and where their weights come from."""

    def __iter__(self):
        return iter(ENTRIES)

    def __len__(self) -> int:
        return len(ENTRIES)

    def __str__(self) -> str:
        return format_table([("name", "model_type", "source", "weights", "description"),
                             *[(e.name, e.model_type, e.origin, e.source, e.description) for e in ENTRIES]])

    __repr__ = __str__


model_zoo = ModelZoo()
