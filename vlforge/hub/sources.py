"""Where a zoo model's files are: a path the user gives, the Hugging Face cache (HF_HOME), a directory
under $VLFORGE_HOME, or (online only) the hub, fetched into the Hugging Face cache.

Nothing here waits on a network that is not there: offline (HF_HUB_OFFLINE=1 or VLFORGE_OFFLINE=1)
the cache is the only place looked at, and a miss is an error that names the missing file, the
directory to put it in and where to get it.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Callable

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from vlforge.models.zoo_entry import ZooEntry

_TRUE = ("1", "true", "yes", "on")


class WeightsNotFoundError(FileNotFoundError):
    """A model's weights, config or tokenizer files are not on this machine and cannot be fetched."""


def vlforge_home() -> Path:
    """The cache of fetched models: $VLFORGE_HOME, default ~/.cache/vlforge."""
    return Path(os.environ.get("VLFORGE_HOME") or Path.home() / ".cache" / "vlforge").expanduser()


def offline() -> bool:
    return any(os.environ.get(var, "").lower() in _TRUE for var in ("HF_HUB_OFFLINE", "VLFORGE_OFFLINE"))


def cache_dir(entry: ZooEntry) -> Path:
    """Where an entry's files are kept or put by hand: `$VLFORGE_HOME/models/<name>/<type>`, and for a
    single-file release (LAVIS's) `$VLFORGE_HOME/models/<origin>/<name>/<type>`, so that two releases
    of one name and type never share a directory."""
    if entry.kind == "url":
        return vlforge_home() / "models" / entry.origin / entry.name / entry.model_type
    return vlforge_home() / "models" / entry.name / entry.model_type


# Fetched when the repo has them, not required: the tokenizer loads from vocab.txt without them.
OPTIONAL_FILES = ("special_tokens_map.json", "tokenizer.json", "preprocessor_config.json")


def weights_file(directory: Path, entry: ZooEntry) -> Path | None:
    """The first of the entry's weights files that `directory` holds (safetensors come first: no
    pickle, and a repo's second copy is never fetched)."""
    return next((directory / name for name in entry.weights if (directory / name).is_file()), None)


def shard_pattern(weights: str) -> str | None:
    """The file names of a sharded checkpoint's shards, as a glob, for its index name
    ("model.safetensors.index.json" -> "model-*-of-*.safetensors"); None for a single file."""
    if not weights.endswith(".index.json"):
        return None
    stem, _, suffix = weights[: -len(".index.json")].rpartition(".")
    return f"{stem}-*-of-*.{suffix}"


def missing_files(directory: Path, entry: ZooEntry) -> list[str]:
    """What `directory` lacks of an "hf:" entry: its listed files, and one weights file (with every
    shard a sharded checkpoint's index names)."""
    missing = [name for name in entry.files if not (directory / name).is_file()]
    found = weights_file(directory, entry)
    if found is None:
        missing.append(entry.weights[0])
    elif shard_pattern(found.name):
        shards = sorted(set(json.loads(found.read_text())["weight_map"].values()))
        missing += [shard for shard in shards if not (directory / shard).is_file()]
    return missing


def _patterns(entry: ZooEntry, weights: str) -> list[str]:
    return [*entry.files, *OPTIONAL_FILES, weights, *filter(None, [shard_pattern(weights)])]


def _cached_snapshot(entry: ZooEntry) -> Path | None:
    """The entry's snapshot in the Hugging Face cache, if one is there with every file loading needs."""
    try:
        snapshot = Path(snapshot_download(entry.location, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return snapshot if not missing_files(snapshot, entry) else None


def hf_model_dir(entry: ZooEntry) -> Path:
    """The HF-format directory of an "hf:" entry: its snapshot in the Hugging Face cache (HF_HOME), or
    a directory of the files put by hand at `$VLFORGE_HOME/models/<name>/<type>`; online, what is
    missing is fetched into the Hugging Face cache first."""
    snapshot = _cached_snapshot(entry)
    if snapshot is not None:
        return snapshot
    local = cache_dir(entry)
    missing = missing_files(local, entry)
    if not missing:
        return local
    url = f"https://huggingface.co/{entry.location}"
    where = (f"download {', '.join(missing)} from {url} into {local} (or into the Hugging Face cache, "
             f"{hf_constants.HF_HUB_CACHE}), or pass checkpoint=<a directory holding them>")
    if offline():
        raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: {local / missing[0]} is missing and the hub "
                                   f"is off (HF_HUB_OFFLINE / VLFORGE_OFFLINE): {where}")
    snapshot = local
    for weights in entry.weights:
        try:
            # A short timeout and no retry loop: a machine without network learns so in seconds.
            snapshot = Path(snapshot_download(entry.location, allow_patterns=_patterns(entry, weights),
                                              etag_timeout=5))
        except Exception as err:  # noqa: BLE001 - every failure to fetch becomes one actionable message
            raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: {local / missing[0]} is missing and "
                                       f"fetching it from {url} failed ({type(err).__name__}: {err}): {where}") from None
        if (snapshot / weights).is_file():
            break
    missing = missing_files(snapshot, entry)
    if missing:
        raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: {url} has no {', '.join(missing)}: {where}")
    return snapshot


_HOST = socket.gethostname().replace(".", "-")  # part names split on dots


def _remove_stale_parts(target: Path) -> None:
    """Delete the temporary files of earlier downloads of `target` on this host whose process is gone:
    a killed download runs no cleanup, and a weights file's part can be gigabytes. Parts of other
    hosts sharing the cache (a network file system) are left alone: their processes cannot be seen."""
    for part in target.parent.glob(f".{target.name}.{_HOST}.*.part"):
        pid = part.name[len(f".{target.name}.{_HOST}."):-len(".part")]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            part.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


def download(url: str, target: Path, timeout: float = 10.0) -> None:
    """`url` into `target`, through a temporary name in the same directory that is renamed once every
    byte has come: an interrupted or short download leaves nothing under `target`. `timeout` bounds
    the connection and each read; there is no retry."""
    import shutil
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(target)
    part = target.with_name(f".{target.name}.{_HOST}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
            expected = response.headers.get("Content-Length")
        if expected is not None and part.stat().st_size != int(expected):
            raise OSError(f"{url} sent {part.stat().st_size} of its {expected} bytes")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def url_model_dir(entry: ZooEntry) -> Path:
    """The cached directory of a "url:" entry: its weights file from the entry's address and its
    `files` (a tokenizer) from the hub repo `files_repo`, fetched first when online and incomplete."""
    local = cache_dir(entry)
    missing = missing_files(local, entry)
    if not missing:
        return local
    hub = f"https://huggingface.co/{entry.files_repo}"
    origin = {entry.weights[0]: entry.location, **{name: hub for name in entry.files}}
    by_origin: dict[str, list[str]] = {}
    for name in missing:
        by_origin.setdefault(origin[name], []).append(name)
    fetches = "; ".join(", ".join(names) + f" from {address}" for address, names in by_origin.items())
    where = f"download {fetches} into {local}, or pass checkpoint=<a directory holding {', '.join(origin)}>"
    if offline():
        raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: {local / missing[0]} is missing and the "
                                   f"network is off (HF_HUB_OFFLINE / VLFORGE_OFFLINE): {where}")
    try:
        if any(name in entry.files for name in missing):
            snapshot_download(entry.files_repo, allow_patterns=list(entry.files), local_dir=str(local), etag_timeout=5)
        if entry.weights[0] in missing:
            download(entry.location, local / entry.weights[0])
    except Exception as err:  # noqa: BLE001 - every failure to fetch becomes one actionable message
        raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: {local / missing[0]} is missing and fetching "
                                   f"failed ({type(err).__name__}: {err}): {where}") from None
    missing = missing_files(local, entry)
    if missing:
        raise WeightsNotFoundError(f"{entry.name}/{entry.model_type}: no {', '.join(missing)} after fetching: {where}")
    return local


def _fetch_or_explain(entry: ZooEntry, missing: Path, where: str, fetch: Callable[[], object]) -> None:
    """Run `fetch` for a file `missing` of `entry`, or fail naming it and `where` to get it: at once when
    offline, with the cause when fetching fails."""
    label = f"{entry.name}/{entry.model_type}: {missing}"
    if offline():
        raise WeightsNotFoundError(f"{label} is missing and the network is off (HF_HUB_OFFLINE / VLFORGE_OFFLINE): {where}")
    try:
        fetch()
    except Exception as err:  # noqa: BLE001 - every failure to fetch becomes one actionable message
        raise WeightsNotFoundError(f"{label} is missing and fetching it failed ({type(err).__name__}: {err}): {where}") from None


def entry_files_dir(entry: ZooEntry) -> Path:
    """The cached directory holding a "url:" entry's `files` (its tokenizer, from the hub repo
    `files_repo`), for a weights file the user gives: fetched first when online and missing."""
    local = cache_dir(entry)
    missing = [name for name in entry.files if not (local / name).is_file()]
    if missing:
        where = (f"download {', '.join(missing)} from https://huggingface.co/{entry.files_repo} into {local}, "
                 "or put them beside the weights file")
        _fetch_or_explain(entry, local / missing[0], where, lambda: snapshot_download(
            entry.files_repo, allow_patterns=list(entry.files), local_dir=str(local), etag_timeout=5))
    return local


def tower_file(entry: ZooEntry) -> Path:
    """An entry's separate image-tower weights file (`tower_source`), in its cache directory: fetched
    first when online and missing."""
    address = entry.tower_source.partition(":")[2]
    target = cache_dir(entry) / address.rpartition("/")[2]
    if not target.is_file():
        where = f"download {address} into {target.parent}, or put it beside the weights file"
        _fetch_or_explain(entry, target, where, lambda: download(address, target))
    return target
