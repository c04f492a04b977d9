"""`python -m vlforge.cli ...` is the `vlforge` command run by a chosen interpreter (the sbatch scripts use it)."""
import sys

from vlforge.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
