"""One request's output text, decoded token by token, and its stop strings."""

from __future__ import annotations

from qwen3_aot.runtime.text.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding gives for an incomplete UTF-8 sequence


class Detokenizer:
    """One request's output text, built token by token, with its stop strings.

    Qwen3's byte-level BPE splits a multi-byte character over several tokens, and decoding
    part of one gives U+FFFD. So tokens are decoded from the last point where the text was
    complete, and a piece ending in U+FFFD is held back until a later token completes it (or
    the request ends: `flush`). `text` is then always whole characters, cut just before the
    first stop string found. `release` gives what may be shown so far: it holds back the last
    len(longest stop) - 1 characters, which could still turn into a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer, self._stop = tokenizer, stop
        self._hold = max(map(len, stop), default=1) - 1
        self._pending: list[int] = []  # tokens not yet in `text`
        self._shown = 0
        self.text = ""
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> bool:
        """Add one output token; True when the text now reaches a stop string."""
        self._pending.append(token_id)
        piece = self._tokenizer.decode(self._pending)
        if piece.endswith(REPLACEMENT):
            return False
        return self._append(piece)

    def flush(self) -> bool:
        """At the end of the request: decode what is held back, even if incomplete."""
        return self._append(self._tokenizer.decode(self._pending)) if self._pending else self.stopped

    def release(self, final: bool = False) -> str:
        """The text not shown before; all of it once `final` or a stop string was found."""
        end = len(self.text) if final or self.stopped else max(self._shown, len(self.text) - self._hold)
        piece, self._shown = self.text[self._shown:end], end
        return piece

    def _append(self, piece: str) -> bool:
        self._pending = []
        start = max(0, len(self.text) - self._hold)  # a new stop string ends inside `piece`
        self.text += piece
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        return self.stopped
