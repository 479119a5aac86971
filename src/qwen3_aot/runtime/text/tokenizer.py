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
        # encode_batch, not encode: tokenizers' encode holds the GIL for the whole text, which
        # stalls every other thread of the process (a server's event loop among them) for as long
        # as a long prompt takes; encode_batch releases it
        return self._tok.encode_batch([text])[0].ids

    def max_bytes_per_token(self) -> int | None:
        """The most UTF-8 bytes of input text one token can stand for (special tokens included),
        so that a text of more than n times this cannot fit n tokens; None when there is no
        such bound (no tokenizer.json, or a normalizer that can delete text)."""
        if self._tok is None:
            return None
        shrink = _normalizer_shrink(json.loads(self._tok.to_str()).get("normalizer"))
        if shrink is None:
            return None
        size = self._tok.get_vocab_size(with_added_tokens=True)
        texts = self._tok.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
        return shrink * max(len(t.encode()) for t in texts)

    @property
    def backend(self) -> _HFTokenizer | None:
        """The `tokenizers` tokenizer (None without tokenizer.json), for what needs its vocabulary
        (structured outputs build xgrammar's token table from it)."""
        return self._tok

    def token_id(self, token: str) -> int | None:
        """The id of a token given by its text (an added token such as `</think>`), if it has one."""
        return None if self._tok is None else self._tok.token_to_id(token)

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

# How many times fewer UTF-8 bytes a normalizer can leave of a text. Unicode normalization and
# lowercasing map at most 3 bytes to 1 (Hangul jamo compose 9 bytes into 3; fullwidth letters
# and the Kelvin sign are 3 bytes, their ASCII forms 1); Prepend only adds. One that is not
# here may delete text (Strip, Replace, BertNormalizer's cleaning): no bound.
_NORMALIZER_SHRINK = {"NFC": 3, "NFKC": 3, "NFD": 3, "NFKD": 3, "Lowercase": 3, "Prepend": 1}


def _normalizer_shrink(normalizer: dict | None) -> int | None:
    """The factor of _NORMALIZER_SHRINK for tokenizer.json's normalizer (a Sequence multiplies)."""
    if normalizer is None:
        return 1
    if normalizer.get("type") == "Sequence":
        factor = 1
        for part in normalizer.get("normalizers", []):
            f = _normalizer_shrink(part)
            if f is None:
                return None
            factor *= f
        return factor
    return _NORMALIZER_SHRINK.get(normalizer.get("type"))
