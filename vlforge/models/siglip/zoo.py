"""SigLIP's rows of the model zoo: the demo run."""
from __future__ import annotations

from vlforge.models.zoo_entry import ZooEntry, demo_run

ZOO: tuple[ZooEntry, ...] = (
    demo_run("siglip_feature_extractor", "siglip_demo", "the SigLIP demo's run (runs/siglip_demo)"),
)
