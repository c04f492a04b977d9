"""Token ids to text as they arrive: deltas that only ever extend what was sent, and stop strings.

A token can change how the text before it decodes (a WordPiece `##` continuation joins the previous
word, a byte-level piece completes a character), so the last token's text is held back until the next
one arrives, as is any tail that could be the start of a stop string. The concatenated deltas equal
the final text, which equals what the model's `generate` would return (stripped, specials skipped).
"""
from __future__ import annotations

from typing import Any, Sequence


class TextStream:
    """Feed ids with `push`; each returns the new text to send (possibly empty). `stopped` tells when
    a stop string or the end token ended the text; `finish` returns the rest."""

    def __init__(self, tokenizer: Any, eos_id: int, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped: str | None = None  # "eos" or "stop" once the text has ended
        self._text = ""
        self._decoded = ""  # the whole decode of `ids`, before any stop string cut it

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _cut_at_stop(self, text: str) -> str:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = "stop"
            return text[: min(hits)].rstrip()
        return text

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        if token == self.eos_id:
            self.stopped = "eos"
            return ""
        self.ids.append(token)
        # The text without the newest token is the previous push's whole decode: one decode a token.
        safe, self._decoded = self._decoded, self._decode(self.ids)
        self._text = self._cut_at_stop(self._decoded)
        if self.stopped:
            return ""
        if self.stop:
            safe = safe[: max(0, len(safe) - max(len(s) for s in self.stop) + 1)]
        safe = safe.rstrip().rstrip("\ufffd")
        if not safe.startswith(self.sent) or len(safe) <= len(self.sent) or not self._text.startswith(safe):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    @property
    def text(self) -> str:
        return self._text

    def finish(self) -> str:
        """The text not sent yet (the whole rest: no later token can change it now)."""
        if not self._text.startswith(self.sent):  # cannot happen for prefix-stable tokenizers; keep the sent text
            return ""
        delta, self.sent = self._text[len(self.sent):], self._text
        return delta
