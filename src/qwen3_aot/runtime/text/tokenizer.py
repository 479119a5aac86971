"""The artifact's tokenizer (tokenizer.json through `tokenizers`, eos ids from
generation_config.json); a request's output text is text/detokenizer.py."""

from __future__ import annotations

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
