"""What each rank of an evaluation runs under a process launcher. `vlforge eval --nproc N` starts
DeepSpeed's launcher on this file; other launchers can run it too, from an installed package:

    torchrun --nproc-per-node 8 -m vlforge.cli.evaluate_entry recipe=clip_demo checkpoint=runs/clip_demo
    srun python -m vlforge.cli.evaluate_entry recipe=clip_demo checkpoint=runs/clip_demo
"""
import os
import sys

if __name__ == "__main__" and sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    # Run as a file (DeepSpeed's launcher does), this directory comes first on sys.path, where its
    # module names would shadow top-level modules of the same name.
    del sys.path[0]

from vlforge.cli.jobs import EVALUATE  # noqa: E402

if __name__ == "__main__":
    EVALUATE.run()
