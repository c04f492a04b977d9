"""A BERT-style WordPiece tokenizer for the demo dataset's closed vocabulary.

The vocabulary is derived from word counts rather than with `tokenizers`' WordPieceTrainer:
that trainer breaks ties in hash-map order, so two builds of the same data (say, on two nodes
without a shared filesystem) would give different token ids. Counting whole words is exact
for a corpus this small, and every character plus its `##` continuation is included so text
outside the corpus still splits into pieces instead of [UNK].
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
BASE_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation


def wordpiece_vocab(texts: Iterable[str], vocab_size: int) -> list[str]:
    """Special tokens, single characters (word-initial and ##continuation), then the most frequent words.

    Characters are always kept, so the result can exceed `vocab_size` when that is very small.
    """
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted(set(BASE_ALPHABET) | {char for word in counts for char in word})
    vocab = list(SPECIAL_TOKENS) + alphabet + ["##" + char for char in alphabet]
    known = set(vocab)
    # Most frequent first; ties broken alphabetically so the order never depends on input order.
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
    return vocab


def save_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, max_length: int = 128) -> int:
    """Build the tokenizer, save it so `AutoTokenizer.from_pretrained(out_dir)` loads it; return its size."""
    vocab = wordpiece_vocab(texts, vocab_size)
    save_vocab_tokenizer(vocab, out_dir, max_length)
    return len(vocab)


def save_vocab_tokenizer(vocab: list[str], out_dir: str | Path, max_length: int = 128) -> None:
    """A BERT-style WordPiece tokenizer of exactly `vocab` (token i has id i; it must hold every one of
    SPECIAL_TOKENS), saved so `AutoTokenizer.from_pretrained(out_dir)` loads it."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"the vocabulary lacks the special tokens {missing}")
    ids = {token: index for index, token in enumerate(vocab)}
    tokenizer = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",  # BLIP-style decoders start generation from [DEC]
        model_max_length=max_length,
    )
    out_dir = Path(out_dir)
    wrapped.save_pretrained(str(out_dir))
    # transformers 5 records its internal "TokenizersBackend"; the public alias also loads under 4.x.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
