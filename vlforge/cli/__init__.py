"""The `vlforge` command: `vlforge train|eval|export|make-shards|slurm|recipes|zoo` (vlforge.cli.main)."""
