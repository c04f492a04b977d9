"""Streamed text only ever extends what was sent, ends equal to the whole decode, and stops at stop strings."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_recipes import save_tokenizer
from vlforge.core.tokenizers import load_tokenizer
from vlforge.datasets.demo_tokenizer import save_wordpiece_tokenizer
from vlforge.serve.text_stream import TextStream


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("wp")
    save_wordpiece_tokenizer(["a red circle, left of the blue squares.", "what colour is it?"], 80, out)
    return load_tokenizer(str(out))


def _stream(tok, ids: list[int], stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(tok, eos_id=tok.sep_token_id, stop=stop)
    deltas = [stream.push(i) for i in ids]
    deltas.append(stream.finish())
    return deltas, stream


def test_deltas_concatenate_to_the_decoded_text_with_word_pieces(wordpiece) -> None:
    ids = wordpiece("a red circle, left of the blue squares.", add_special_tokens=False).input_ids
    assert any(wordpiece.convert_ids_to_tokens(i).startswith("##") for i in ids)  # pieces join words
    deltas, stream = _stream(wordpiece, ids)
    expected = wordpiece.decode(ids, skip_special_tokens=True).strip()
    assert "".join(deltas) == expected == stream.text
    sent = ""
    for delta in deltas:  # every prefix sent is a prefix of the final text
        sent += delta
        assert expected.startswith(sent)
    assert sum(1 for d in deltas if d) > 2


def test_stop_string_ends_the_text_before_it_and_is_never_sent(wordpiece) -> None:
    ids = wordpiece("a red circle, left of the blue squares.", add_special_tokens=False).input_ids
    deltas, stream = _stream(wordpiece, ids, stop=["left"])
    assert stream.stopped == "stop"
    assert "".join(deltas) == stream.text == "a red circle,"


def test_end_token_stops_and_specials_are_skipped(tmp_path: Path) -> None:
    tok = load_tokenizer(str(save_tokenizer(tmp_path / "tok")))
    ids = tok("a red circle", add_special_tokens=False).input_ids
    deltas, stream = _stream(tok, [*ids, tok.sep_token_id, *ids])
    assert stream.stopped == "eos" and "".join(deltas) == "a red circle"
