"""Tokenizer and incremental detokenisation: whole characters only, stop strings cut exactly,
eos ids from generation_config.json."""

import json
import shutil
import unicodedata

import pytest

from suite_support import FIXTURE
from qwen3_aot import Qwen3AotError
from qwen3_aot.runtime.text.tokenizer import Tokenizer
from qwen3_aot.runtime.text.detokenizer import REPLACEMENT, Detokenizer

TEXT = "héllo wörld → ünïcode 日本 and “quotes”"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(FIXTURE)


def pieces(tok: Tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    """Feed ids one at a time as the engine does; the pieces a stream would yield."""
    ts, out = Detokenizer(tok, stop), []
    for t in ids:
        stopped = ts.push(t)
        out.append(ts.release())
        if stopped:
            break
    ts.flush()
    out.append(ts.release(final=True))
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
    ts = Detokenizer(tok)
    for t in ids[:-1]:  # all but the last byte of 日
        ts.push(t)
    assert ts.release() == "a"
    ts.flush()
    assert ts.release(final=True) == REPLACEMENT


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
    ts = Detokenizer(tok, ("zzzzz",))
    shown = ""
    for t in ids:
        ts.push(t)
        shown += ts.release()
        assert len(ts.text) - len(shown) <= 4 + 1  # at most len(stop) - 1, plus an unfinished char
    ts.flush()
    assert not ts.stopped and shown + ts.release(final=True) == TEXT


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
    assert tok.max_bytes_per_token() is None


@pytest.mark.parametrize("normalizer, factor", [
    (None, 1),
    ({"type": "NFC"}, 3),
    ({"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}, 9),
    ({"type": "Replace", "pattern": {"String": "ab"}, "content": ""}, None),
], ids=["none", "NFC", "NFKC then lowercase", "replace deletes"])
def test_bytes_per_token_allow_for_what_the_normalizer_can_shrink(tmp_path, normalizer, factor):
    doc = json.loads((FIXTURE / "tokenizer.json").read_text())
    assert doc.get("normalizer") is None  # the fixture's own: the base the others multiply
    doc["normalizer"] = normalizer
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    base = Tokenizer.from_dir(FIXTURE).max_bytes_per_token()
    assert Tokenizer.from_dir(tmp_path).max_bytes_per_token() == (None if factor is None else factor * base)


# --- Qwen's real tokenizer (tests/runtime/conftest.py: qwen_checkpoint) ----------------------

QWEN_TEXTS = {
    "cjk": "你好，世界！日本語のテキストと한국어 텍스트。罕见字：龘𠀀𪚥",
    "emoji": "家庭 👨‍👩‍👧‍👦，旗 🇫🇷🇯🇵，手 👍🏽，想 🤔✨",
    "code": "def f(x):\n\tif x:\r\n\t\treturn '日本'  # ü\n\n\n    pass\t\n",
}


@pytest.fixture(scope="module")
def qwen(qwen_checkpoint) -> Tokenizer:
    return Tokenizer.from_dir(qwen_checkpoint)


def test_real_qwen_tokenizer_encodes_as_qwen3(qwen):
    assert qwen.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert qwen.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert qwen.eos_token_ids == (151645, 151643)


@pytest.mark.parametrize("text", QWEN_TEXTS.values(), ids=QWEN_TEXTS.keys())
def test_real_qwen_tokenizer_round_trips(qwen, text):
    assert qwen.decode(qwen.encode(text)) == text


def test_real_qwen_bytes_per_token_bound_every_text_and_one_token_reaches_a_third_of_it(qwen):
    per_token = qwen.max_bytes_per_token()
    assert per_token % 3 == 0 and len(qwen.encode(" " * (per_token // 3))) == 1  # NFC: a factor of 3 on top
    decomposed = unicodedata.normalize("NFD", QWEN_TEXTS["cjk"] * 20)  # NFC composes it back: fewer bytes
    for text in (*QWEN_TEXTS.values(), decomposed, " " * 5000, "-" * 5000, "<|im_start|>" * 50):
        assert len(text.encode()) <= per_token * len(qwen.encode(text))


def test_real_qwen_decode_drops_special_tokens_only(qwen):
    text = "<|im_start|>assistant\n<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|><|endoftext|>"
    ids = qwen.encode(text)
    assert {151644, 151667, 151668, 151657, 151658, 151645, 151643} <= set(ids)  # each one token
    # <think> and <tool_call> are added tokens with special=False in Qwen3: the text keeps them
    assert qwen.decode(ids) == "assistant\n<think>\nx\n</think>\n\n<tool_call>\n{}\n</tool_call>"


@pytest.mark.parametrize("text", QWEN_TEXTS.values(), ids=QWEN_TEXTS.keys())
def test_real_qwen_streaming_gives_whole_characters(qwen, text):
    ids = qwen.encode(text)
    out, ts = pieces(qwen, ids)
    assert all(REPLACEMENT not in p for p in out)
    assert "".join(out) == ts.text == qwen.decode(ids) == text
    assert len(out) > len(ids) // 2  # it streamed


@pytest.mark.parametrize("text", [QWEN_TEXTS["cjk"], QWEN_TEXTS["emoji"]], ids=["cjk", "emoji"])
def test_real_qwen_merges_split_characters_across_tokens(qwen, text):
    # what the streaming test above is about: some tokens hold part of a character
    assert any(REPLACEMENT in qwen.decode([t]) for t in qwen.encode(text))


@pytest.mark.parametrize("text, stop", [
    ("你好世界，再见世界", ("再见",)),
    (QWEN_TEXTS["cjk"], ("𠀀",)),  # a stop string of one split character
    (QWEN_TEXTS["emoji"], ("👩",)),  # inside a ZWJ sequence
    (QWEN_TEXTS["emoji"], ("🇯🇵", "手")),  # a flag: two regional indicators
    (QWEN_TEXTS["code"], ("\t\treturn",)),
])
def test_real_qwen_stop_string_inside_multibyte_text(qwen, text, stop):
    out, ts = pieces(qwen, qwen.encode(text), stop)
    want = text[:min(text.index(s) for s in stop)]
    assert ts.stopped and ts.text == want and "".join(out) == want
    assert all(REPLACEMENT not in p for p in out)
