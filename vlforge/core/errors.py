"""The errors every layer raises and every caller may catch: a bad config, a bad checkpoint."""
from __future__ import annotations


class ConfigError(ValueError):
    """A recipe or override that cannot run; the message names the key."""


class CheckpointError(RuntimeError):
    pass
