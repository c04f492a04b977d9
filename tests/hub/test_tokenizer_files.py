"""A source's tokenizer with the special tokens its code adds (LAVIS's BLIP: [DEC] as bos, then [ENC])."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.lavis_fixtures import FIXTURES
from vlforge.core.tokenizers import load_tokenizer, special_token_id
from vlforge.hub.tokenizer_files import tokenizer_with_special_tokens

_BLIP = (("bos_token", "[DEC]"), ("additional_special_tokens", ("[ENC]",)))


def test_tokens_follow_the_vocabulary_in_order_and_the_directory_is_reused(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLFORGE_HOME", str(tmp_path))
    vocab = len((FIXTURES / "vocab.txt").read_text().split())
    directory = tokenizer_with_special_tokens(FIXTURES, _BLIP)
    assert directory.parent == tmp_path / "tokenizers"
    tok = load_tokenizer(str(directory))
    assert (tok.bos_token, tok.bos_token_id) == ("[DEC]", vocab)
    assert special_token_id(str(directory), "[ENC]", "enc_token_id") == vocab + 1
    assert tok("a dog").input_ids[0] == tok.cls_token_id  # the text itself still starts with [CLS]
    assert tokenizer_with_special_tokens(FIXTURES, _BLIP) == directory
    assert tokenizer_with_special_tokens(FIXTURES, ()) == FIXTURES
    with pytest.raises(ValueError, match=r"enc_token_id='\[XYZ\]'.*has no such token"):
        special_token_id(str(directory), "[XYZ]", "enc_token_id")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        special_token_id(None, "[ENC]", "enc_token_id")
