"""Collation inside the loader workers: stack tensors, tokenize and pad text to the batch's longest."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from vlforge.core.tokenizers import load_tokenizer

# Imported here, in the main process: importing it first inside a forked loader worker trips wandb's
# import hooks, which refuse to run after a fork.


class Collator:
    """Samples (dicts) -> one batch dict.

    Tensors are stacked; each key in `text_keys` holding strings becomes `{key}_input_ids` and
    `{key}_attention_mask`, padded to the longest in the batch (at most `max_len`); anything else is
    kept as a list. The tokenizer is looked up by name, so the collator pickles cheaply into workers.

    `prompts` maps a text key to an instruction / prompt prefix (e.g. {"text": "a picture of "}). Its
    texts are then tokenized as `[CLS] prompt text [SEP]` (the tokenizer's own special tokens): the
    prompt and the text are tokenized separately, so the prompt's tokens are the same in every sample,
    and truncation to `max_len` shortens the text, never the prompt. The batch also gets
    `{key}_prompt_length` [B]: the number of tokens before the text (leading special tokens included),
    the positions a model leaves out of its loss (with the default right padding they are the first
    ones). A prompt that leaves no room for any text within `max_len` is refused here.

    A text key whose values are lists (several texts per sample, e.g. every question of an image) is
    flattened, in sample order, and the batch gets `{key}_sample_index` [T]: the sample (row of the
    stacked tensors) each text belongs to. Text keys listed together must have equally long lists.
    """

    def __init__(self, tokenizer: str, max_len: int, text_keys: Sequence[str] = ("text",),
                 prompts: Mapping[str, str] | None = None) -> None:
        self.tokenizer_name, self.max_len, self.text_keys = tokenizer, max_len, tuple(text_keys)
        tok = load_tokenizer(tokenizer)  # fail now, naming the tokenizer, not later inside a worker
        self.prompts = dict(prompts or {})
        # Per prompted key: (ids before the text: leading specials + prompt; ids after it: trailing specials).
        self._frames: dict[str, tuple[list[int], list[int]]] = {}
        if self.prompts:
            prefix, suffix = _special_frame(tok)
            for key, prompt in self.prompts.items():
                if key not in self.text_keys:
                    raise ValueError(f"prompts: '{key}' is not a text key ({', '.join(self.text_keys)})")
                if not isinstance(prompt, str):
                    raise ValueError(f"prompts.{key}: expected a string, got {type(prompt).__name__}")
                prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
                fixed = len(prefix) + len(prompt_ids) + len(suffix)
                if fixed >= max_len:
                    raise ValueError(
                        f"prompts.{key}: the prompt {prompt!r} is {len(prompt_ids)} tokens; with "
                        f"{len(prefix) + len(suffix)} special tokens it leaves no room for text within "
                        f"max_len={max_len}"
                    )
                self._frames[key] = (prefix + prompt_ids, suffix)

    @property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.tokenizer_name)

    def _prompted(self, key: str, values: list[str]) -> dict[str, torch.Tensor]:
        head, tail = self._frames[key]
        room = self.max_len - len(head) - len(tail)
        texts = self.tokenizer(values, add_special_tokens=False)["input_ids"]
        ids = [head + text[:room] + tail for text in texts]
        padded = self.tokenizer.pad({"input_ids": ids}, padding="longest", return_tensors="pt")
        return {
            f"{key}_input_ids": padded["input_ids"],
            f"{key}_attention_mask": padded["attention_mask"],
            f"{key}_prompt_length": torch.full((len(values),), len(head), dtype=torch.long),
        }

    def __call__(self, samples: list[dict]) -> dict:
        batch: dict[str, Any] = {}
        listed = [key for key in self.text_keys if key in samples[0] and isinstance(samples[0][key], list)]
        for sample in samples:
            if len({len(sample[key]) for key in listed}) > 1:
                counts = ", ".join(f"{len(sample[key])} {key}" for key in listed)
                raise ValueError(f"sample {sample.get('image_id', '?')}: {counts}; texts listed together must pair up")
        for key in samples[0]:
            values = [sample[key] for sample in samples]
            if key in self.text_keys and isinstance(values[0], list):
                batch[f"{key}_sample_index"] = torch.tensor([row for row, texts in enumerate(values) for _ in texts])
                values = [text for texts in values for text in texts]
            if key in self._frames:
                batch.update(self._prompted(key, values))
            elif key in self.text_keys:
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


def _special_frame(tok: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text (BERT: [CLS] / [SEP])."""
    probe = "a"
    bare = tok(probe, add_special_tokens=False)["input_ids"]
    full = tok(probe)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError(f"cannot locate the text among the special tokens of tokenizer {tok.name_or_path!r}")
