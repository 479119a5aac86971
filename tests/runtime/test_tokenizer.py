"""Tokenizer and incremental detokenisation: whole characters only, stop strings cut exactly,
eos ids from generation_config.json."""

import json
import shutil

import pytest

from conftest import FIXTURE
from qwen3_aot import Qwen3AotError
from qwen3_aot.runtime.tokenizer import REPLACEMENT, TextStream, Tokenizer

TEXT = "héllo wörld → ünïcode 日本 and “quotes”"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(FIXTURE)


def pieces(tok: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    """Feed ids one at a time as the engine does; the pieces a stream would yield."""
    ts, out = TextStream(tok, stop), []
    for t in ids:
        stopped = ts.push(t)
        out.append(ts.take())
        if stopped:
            break
    ts.flush()
    out.append(ts.take(final=True))
    return [p for p in out if p], ts


def test_multibyte_characters_are_never_split(tok):
    ids = tok.encode(TEXT)
    # the byte-level BPE does split characters here: decoding some tokens alone gives U+FFFD
    assert any(REPLACEMENT in tok.decode([t]) for t in ids)
    out, ts = pieces(tok, ids)
    assert all(REPLACEMENT not in p for p in out)
    assert "".join(out) == ts.text == TEXT
    assert len(out) > 10  # it did stream, piece by piece


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tok):
    ids = tok.encode("a日")
    ts = TextStream(tok)
    for t in ids[:-1]:  # all but the last byte of 日
        ts.push(t)
    assert ts.take() == "a"
    ts.flush()
    assert ts.take(final=True) == REPLACEMENT


@pytest.mark.parametrize("stop, cut_at", [
    (("wörld",), "wörld"),              # spans several tokens and a split character
    (("llo w",), "llo w"),              # starts and ends inside tokens
    (("日本", "ünï"), "ünï"),            # the earlier of two stop strings wins
    (("”",), "”"),                      # the very last character
])
def test_stop_string_cuts_the_text_exactly(tok, stop, cut_at):
    ids = tok.encode(TEXT)
    out, ts = pieces(tok, ids, stop)
    want = TEXT[:TEXT.index(cut_at)]
    assert ts.stopped and ts.text == want and "".join(out) == want


def test_absent_stop_string_holds_back_only_until_the_end(tok):
    ids = tok.encode(TEXT)
    ts = TextStream(tok, ("zzzzz",))
    shown = ""
    for t in ids:
        ts.push(t)
        shown += ts.take()
        assert len(ts.text) - len(shown) <= 4 + 1  # at most len(stop) - 1, plus an unfinished char
    ts.flush()
    assert not ts.stopped and shown + ts.take(final=True) == TEXT


@pytest.mark.parametrize("eos, want", [(7, (7,)), ([7, 9, 7], (7, 9)), (None, ())])
def test_eos_ids_from_generation_config(tmp_path, eos, want):
    shutil.copy(FIXTURE / "tokenizer.json", tmp_path)
    cfg = {"bos_token_id": 0} if eos is None else {"eos_token_id": eos}
    (tmp_path / "generation_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == want


def test_without_tokenizer_json_text_is_refused(tmp_path):
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_text and tok.decode([5, 6]) == ""
    with pytest.raises(Qwen3AotError, match="token-id prompts only"):
        tok.encode("hello")
