"""The artifact's tokenizer (tokenizer.json through `tokenizers`, eos ids from
generation_config.json); a request's output text is text/detokenizer.py."""

from __future__ import annotations

import functools

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from qwen3_aot.errors import Qwen3AotError

class Tokenizer:
    """Text <-> token ids. An artifact built without tokenizer.json takes token-id prompts
    only: `encode` refuses text, and `decode` gives "" (its completions have no text)."""

    def __init__(self, tokenizer: _HFTokenizer | None, eos_token_ids: tuple[int, ...]) -> None:
        self._tok = tokenizer
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        try:
            tok = _HFTokenizer.from_file(str(path / "tokenizer.json")) if (path / "tokenizer.json").is_file() else None
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise Qwen3AotError(f"{path / 'tokenizer.json'} is not a tokenizer `tokenizers` can read ({e}); "
                                "rebuild the artifact from a checkpoint with a valid tokenizer.json.") from e
        eos: int | list[int] | None = None
        if (path / "generation_config.json").is_file():
            try:
                eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise Qwen3AotError(f"{path / 'generation_config.json'} is not a JSON object ({e}); "
                                    "rebuild the artifact from a checkpoint with a valid one.") from e
        ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(tok, tuple(dict.fromkeys(ids)))

    @property
    def has_text(self) -> bool:
        return self._tok is not None

    def encode(self, text: str) -> list[int]:
        if self._tok is None:
            raise Qwen3AotError("this artifact has no tokenizer.json, so it takes token-id prompts only "
                                "(a list of ints); rebuild it from a checkpoint with tokenizer.json for text.")
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True) if self._tok is not None else ""

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes, which may be part of a UTF-8 character (decode would give
        U+FFFD for them): a byte-level BPE token's characters mapped back to the bytes they
        stand for (GPT-2's table); a special token's text; b"" without a tokenizer."""
        if self._tok is None:
            return b""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        table = _unicode_to_byte()
        if all(ch in table for ch in piece) and type(self._tok.decoder).__name__ == "ByteLevel":
            return bytes(table[ch] for ch in piece)
        return self._tok.decode([token_id], skip_special_tokens=False).encode()


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode, which byte-level BPE vocabularies are written in:
    printable bytes stand for themselves, the others for chars from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars
