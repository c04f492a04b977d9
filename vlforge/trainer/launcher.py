"""What every launch/ script does: fix the environment for the launcher in use, then run one entry
point under Hydra with a root config of recipes/."""
from __future__ import annotations

import importlib
import os
import sys

from vlforge.config.recipes import RECIPES_DIR
from vlforge.core.console import install as install_quiet_console
from vlforge.core.distributed import prepare_launch_env


def launch(config_name: str, entry: str) -> None:
    """Run `entry` ("module:function", taking the composed config) with recipes/<config_name>.yaml."""
    # Before Hydra parses argv (it rejects deepspeed's --local_rank) and before deepspeed is imported
    # (DS_ACCELERATOR).
    sys.argv = prepare_launch_env(sys.argv)
    # Third-party warnings and build output to the run's log from the first import on (VLFORGE_VERBOSE=1: not).
    install_quiet_console()
    import hydra
    from omegaconf import DictConfig

    module, function = entry.split(":")

    @hydra.main(config_path=str(RECIPES_DIR), config_name=config_name, version_base=None)
    def main(cfg: DictConfig) -> None:
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # Running as a job of hydra/launcher=vlforge_slurm: this task's place comes from SLURM, not
            # from the environment of the process that submitted it.
            prepare_launch_env([], fresh=True)
        getattr(importlib.import_module(module), function)(cfg)

    main()
