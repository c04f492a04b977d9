"""Where a zoo model's files are: a path the user gives, the local cache, or (online only) the hub.

Nothing here waits on a network that is not there: offline (HF_HUB_OFFLINE=1 or VLFORGE_OFFLINE=1)
the cache is the only place looked at, and a miss is an error that names the missing file, the
directory to put it in and where to get it.
"""
from __future__ import annotations

import os
from pathlib import Path

from vlforge.models.zoo import ZooEntry

_TRUE = ("1", "true", "yes", "on")


class WeightsNotFoundError(FileNotFoundError):
    """A model's weights, config or tokenizer files are not on this machine and cannot be fetched."""


def vlforge_home() -> Path:
    """The cache of fetched models: $VLFORGE_HOME, default ~/.cache/vlforge."""
    return Path(os.environ.get("VLFORGE_HOME") or Path.home() / ".cache" / "vlforge").expanduser()


def offline() -> bool:
    return any(os.environ.get(var, "").lower() in _TRUE for var in ("HF_HUB_OFFLINE", "VLFORGE_OFFLINE"))


def cache_dir(entry: ZooEntry) -> Path:
    return vlforge_home() / "models" / entry.name / entry.model_type


# Fetched when the repo has them, not required: the tokenizer loads from vocab.txt without them.
OPTIONAL_FILES = ("special_tokens_map.json", "tokenizer.json", "preprocessor_config.json")


def weights_file(directory: Path, entry: ZooEntry) -> Path | None:
    """The first of the entry's weights files that `directory` holds (safetensors come first: no
    pickle, and a repo's second copy is never fetched)."""
    return next((directory / name for name in entry.weights if (directory / name).is_file()), None)


def missing_files(directory: Path, entry: ZooEntry) -> list[str]:
    """What `directory` lacks of an "hf:" entry: its listed files, and one weights file."""
    missing = [name for name in entry.files if not (directory / name).is_file()]
    if weights_file(directory, entry) is None:
        missing.append(entry.weights[0])
    return missing


def hf_model_dir(entry: ZooEntry) -> Path:
    """The cached HF-format directory of an "hf:" entry, fetched first when online and incomplete."""
    local = cache_dir(entry)
    missing = missing_files(local, entry)
    if not missing:
        return local
    url = f"https://huggingface.co/{entry.location}"
    where = (f"download {', '.join(missing)} from {url} into {local}, or pass "
             f"checkpoint=<a directory holding them>")
    if offline():
        raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: {local / missing[0]} is missing and the hub "
                                   f"is off (HF_HUB_OFFLINE / VLFORGE_OFFLINE): {where}")
    from huggingface_hub import snapshot_download

    for weights in entry.weights:
        try:
            # A short timeout and no retry loop: a machine without network learns so in seconds.
            snapshot_download(entry.location, allow_patterns=[*entry.files, *OPTIONAL_FILES, weights], local_dir=str(local),
                              etag_timeout=5)
        except Exception as err:  # noqa: BLE001 - every failure to fetch becomes one actionable message
            raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: {local / missing[0]} is missing and "
                                       f"fetching it from {url} failed ({type(err).__name__}: {err}): {where}") from None
        if (local / weights).is_file():
            break
    missing = missing_files(local, entry)
    if missing:
        raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: {url} has no {', '.join(missing)}: {where}")
    return local
