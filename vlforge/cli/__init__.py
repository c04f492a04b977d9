"""The `vlforge` command: `vlforge train|eval|export|make-shards|slurm|recipes|zoo` (vlforge.cli.main).

Nothing is imported here, so that the per-rank entry scripts and launch/*.py import only what they run.
"""
