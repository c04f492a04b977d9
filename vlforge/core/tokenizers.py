"""Tokenizers: loaded once per process from a local directory or the hub, and the ids every model
and collator agree on (end of text, padding)."""
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


def tokenize_texts(tokenizer: str, texts: str | Sequence[str], max_len: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `texts` (a string or a list), padded to the longest and cut at
    `max_len`, on `device`: how models tokenize LAVIS's `text_input` strings at inference."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    encoded = load_tokenizer(tokenizer)(texts, padding="longest", truncation=True, max_length=max_len,
                                        return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def end_token_id(tok: Any) -> int | None:
    """The id that ends a text: eos, or [SEP] for BERT-style tokenizers, which have no eos."""
    return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id


def pad_token_id(tok: Any) -> int:
    """The padding id: the tokenizer's, or 0 for tokenizers without one (LLaMA's)."""
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def special_token_id(tokenizer: str | None, token: int | str | None, what: str) -> int | None:
    """`token` as an id: an id is kept, a token string (LAVIS's "[ENC]") is looked up in the tokenizer
    and must be one of its tokens; None stays None. `what` names the option in errors."""
    if token is None or isinstance(token, int):
        return token
    if tokenizer is None:
        raise ValueError(f"{what}={token!r} is a token, which needs the model's tokenizer; give its id instead")
    tok = load_tokenizer(tokenizer)
    token_id = tok.convert_tokens_to_ids(token)
    if token_id is None or token_id == tok.unk_token_id:
        raise ValueError(f"{what}={token!r}: the tokenizer {tokenizer} has no such token (LAVIS's BLIP tokenizer "
                         "adds [DEC] and [ENC] to BERT's vocabulary)")
    return int(token_id)
