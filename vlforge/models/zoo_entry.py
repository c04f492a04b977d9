"""A row of the model zoo: a (name, model type) pair, the recipe that builds the model and where its
weights come from. Each family lists its rows in its own zoo.py; vlforge.hub.zoo joins them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooEntry:
    name: str
    model_type: str
    recipe: str  # recipes/recipe/<recipe>.yaml: the model node and the image / text processors
    description: str
    # Where the weights are: "hf:<repo id>" (an HF-format model directory: its config.json decides the
    # dimensions and its tokenizer files come along), "url:<address>" (one weights file, saved as
    # `weights[0]`; the recipe sets the dimensions) or "run:<directory>" (a vlforge run or export,
    # relative to the working directory).
    source: str
    # "module:function" mapping the source's keys to the model's (none for vlforge runs).
    converter: str | None = None
    # Files of an "hf:" source that loading needs besides one weights file, and the weights files to
    # look for, in order (vlforge.hub.sources).
    files: tuple[str, ...] = ()
    weights: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    # The hub repo a "url:" source's `files` (its tokenizer) come from; its weights come from the url.
    files_repo: str | None = None
    # Which of the source's config files sets the model's dimensions: "blip" / "blip2" (transformers'
    # config.json) or "open_clip" (open_clip_config.json); none: the recipe's (vlforge.hub.dimensions).
    dimensions: str | None = None
    # Model keys the source has no value for, which keep their initialisation (HF BLIP retrieval keeps
    # no temperature: logit_scale); a name ending in "." covers every key under it (LAVIS's BLIP-2
    # OPT keeps the LM the recipe's `language_model.pretrained` loads).
    ignore: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()  # Hydra overrides on top of the recipe
    # Whose release the row loads, which decides the architecture settings in `overrides` (LayerNorm
    # eps, special tokens, label smoothing, image size): "hf" (transformers' port), "lavis"
    # (salesforce/LAVIS's .pth files), "open_clip" or "vlforge" (a run). `load_model(source=...)` picks
    # the row of one origin where a (name, type) pair has several.
    origin: str = "hf"
    # Special tokens the source's code adds to its tokenizer files when it loads them, as
    # `tokenizer.add_special_tokens` takes them: LAVIS's BLIP adds [DEC] as bos and [ENC].
    special_tokens: tuple[tuple[str, str | tuple[str, ...]], ...] = ()
    # A second weights file for the image tower, read when the weights lack it ("url:<address>"), and
    # the "module:function" that maps it, with the recipe's model node, to the weights' own key names:
    # LAVIS saves only what trains, so its BLIP-2 checkpoints with a frozen tower leave it to eva_vit_g.pth.
    tower_source: str | None = None
    tower_converter: str | None = None

    @property
    def kind(self) -> str:
        return self.source.partition(":")[0]

    @property
    def location(self) -> str:
        return self.source.partition(":")[2]


def demo_run(name: str, recipe: str, description: str) -> ZooEntry:
    """The `demo` type of `name`: the run the `_demo` recipe leaves in runs/ (train it first)."""
    return ZooEntry(name, "demo", recipe, description, f"run:runs/{recipe}", origin="vlforge")
