"""A source's tokenizer as its own code uses it: some add special tokens to the files they load
(LAVIS's BLIP adds [DEC] and [ENC] to bert-base-uncased's), which vlforge's models then expect in
the tokenizer directory they are given. The tokenizer with those tokens is written once, under
$VLFORGE_HOME/tokenizers, named by a digest of the files and the tokens."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from transformers import AutoTokenizer

from vlforge.hub.sources import vlforge_home

# The files a tokenizer directory may hold; the digest covers those present.
_TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "spiece.model", "tokenizer.model")


def tokenizer_with_special_tokens(directory: Path, tokens: Sequence[tuple[str, str | tuple[str, ...]]]) -> Path:
    """A directory holding `directory`'s tokenizer with `tokens` added, in order, as
    `add_special_tokens({key: value})` adds them (so their ids follow the vocabulary in that order);
    `directory` itself when there are none."""
    if not tokens:
        return directory
    digest = hashlib.sha256(json.dumps([list(t) if isinstance(t, tuple) else t for t in tokens]).encode())
    for name in _TOKENIZER_FILES:
        if (directory / name).is_file():
            digest.update(name.encode() + b"\0" + (directory / name).read_bytes())
    target = vlforge_home() / "tokenizers" / digest.hexdigest()[:16]
    if (target / "tokenizer_config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    for key, value in tokens:
        tokenizer.add_special_tokens({key: list(value) if isinstance(value, tuple) else value})
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        try:
            os.replace(staging, target)  # whole or not at all; a concurrent writer's equal copy wins
        except OSError:
            if not (target / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
