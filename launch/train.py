"""Train from a recipe: `deepspeed launch/train.py recipe=clip_demo [overrides]`.

Also runs unchanged under `torchrun`, `srun` and plain `python`. Each process runs what `vlforge train`
runs in its own process (vlforge.cli.jobs.TRAIN).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlforge.cli.jobs import TRAIN  # noqa: E402

if __name__ == "__main__":
    TRAIN.run()
