"""Evaluate a checkpoint with a recipe's task: `deepspeed launch/evaluate.py recipe=blip_caption_demo
checkpoint=runs/blip_caption_demo` (a run directory: its newest complete checkpoint; or a step_N directory).

Also runs under `torchrun`, `srun` and plain `python`, with any number of ranks. Each process runs what
`vlforge eval` runs in its own process (vlforge.cli.jobs.EVALUATE).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlforge.cli.jobs import EVALUATE  # noqa: E402

if __name__ == "__main__":
    EVALUATE.run()
