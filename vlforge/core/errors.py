"""The errors every layer raises and every caller may catch: a bad config, a bad checkpoint, a run
that cannot go on."""
from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key."""


class CheckpointError(RuntimeError):
    pass


class TrainingError(RuntimeError):
    """Training cannot go on (a run of steps with non-finite losses, say); the message says why and
    what was kept."""
