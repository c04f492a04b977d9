"""What each rank of a `train` job runs under a process launcher. `vlforge train --nproc N` starts
DeepSpeed's launcher on this file; other launchers can run it too, from an installed package:

    torchrun --nproc-per-node 8 -m vlforge.cli.train_entry recipe=clip_demo
    srun python -m vlforge.cli.train_entry recipe=clip_demo
"""
import os
import sys

if __name__ == "__main__" and sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    # Run as a file (DeepSpeed's launcher does), this directory comes first on sys.path, where its
    # module names would shadow top-level modules of the same name.
    del sys.path[0]

from vlforge.cli.jobs import TRAIN  # noqa: E402

if __name__ == "__main__":
    TRAIN.run()
