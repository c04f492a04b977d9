"""LLaVA's rows of the model zoo: the demo's finetuned run."""
from __future__ import annotations

from vlforge.models.zoo_entry import ZooEntry, demo_run

ZOO: tuple[ZooEntry, ...] = (
    demo_run("llava", "llava_finetune_demo", "the LLaVA demo's finetuned run (runs/llava_finetune_demo)"),
)
