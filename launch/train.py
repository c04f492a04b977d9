"""Train from a recipe: `deepspeed launch/train.py recipe=clip_demo [overrides]`.

Also runs unchanged under `torchrun`, `srun` and plain `python`.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlforge.trainer.distributed import prepare_launch_env  # noqa: E402

# Before Hydra parses argv (it rejects --local_rank) and before deepspeed is imported (DS_ACCELERATOR).
sys.argv = prepare_launch_env(sys.argv)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vlforge.config.recipes import RECIPES_DIR  # noqa: E402


@hydra.main(config_path=str(RECIPES_DIR), config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    from vlforge.trainer.run import train

    train(cfg)


if __name__ == "__main__":
    main()
