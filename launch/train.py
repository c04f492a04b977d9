"""Train from a recipe: `deepspeed launch/train.py recipe=clip_demo [overrides]`.

Also runs unchanged under `torchrun`, `srun` and plain `python`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlforge.trainer.launcher import launch  # noqa: E402

if __name__ == "__main__":
    launch("train", "vlforge.trainer.run:train")
