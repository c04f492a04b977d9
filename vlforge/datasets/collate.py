"""Collation inside the loader workers: stack tensors, tokenize and pad text to the batch's longest."""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import torch
# Imported here, in the main process: importing it first inside a forked loader worker trips wandb's
# import hooks, which refuse to run after a fork.
from transformers import AutoTokenizer


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str) -> Any:
    """A transformers tokenizer from a local directory, or a hub id (offline when HF_HUB_OFFLINE=1)."""
    if os.path.isdir(name_or_path):
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise OSError(
            f"tokenizer '{name_or_path}' is neither a local directory nor loadable from the hub "
            f"(offline={os.environ.get('HF_HUB_OFFLINE', '0')}): {err}"
        ) from None


class Collator:
    """Samples (dicts) -> one batch dict.

    Tensors are stacked; each key in `text_keys` holding strings becomes `{key}_input_ids` and
    `{key}_attention_mask`, padded to the longest in the batch (at most `max_len`); anything else is
    kept as a list. The tokenizer is looked up by name, so the collator pickles cheaply into workers.
    """

    def __init__(self, tokenizer: str, max_len: int, text_keys: Sequence[str] = ("text",)) -> None:
        self.tokenizer_name, self.max_len, self.text_keys = tokenizer, max_len, tuple(text_keys)
        load_tokenizer(tokenizer)  # fail now, naming the tokenizer, not later inside a worker

    @property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.tokenizer_name)

    def __call__(self, samples: list[dict]) -> dict:
        batch: dict[str, Any] = {}
        for key in samples[0]:
            values = [sample[key] for sample in samples]
            if key in self.text_keys:
                tokens = self.tokenizer(
                    values, padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt"
                )
                batch[f"{key}_input_ids"] = tokens["input_ids"]
                batch[f"{key}_attention_mask"] = tokens["attention_mask"]
            elif isinstance(values[0], torch.Tensor):
                batch[key] = torch.stack(values)
            elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
                batch[key] = torch.tensor(values)
            else:
                batch[key] = values
        return batch
