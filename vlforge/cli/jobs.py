"""The two jobs a recipe runs, training and evaluation: which root config of recipes/ and which entry
point. One definition for `vlforge train|eval`, the per-rank entry scripts and launch/*.py."""
from __future__ import annotations

from dataclasses import dataclass

from vlforge.trainer.launcher import launch


@dataclass(frozen=True)
class Job:
    config_name: str  # recipes/<config_name>.yaml, the root the recipe= override composes into
    entry: str  # "module:function" called with the composed config, imported only once it is composed

    def run(self) -> None:
        """Run the job in this process with the Hydra arguments in sys.argv[1:] (as launch() reads them)."""
        launch(self.config_name, self.entry)


TRAIN = Job("train", "vlforge.trainer.run:train")
EVALUATE = Job("evaluate", "vlforge.trainer.evaluate:evaluate")
