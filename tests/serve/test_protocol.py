"""The server's wire format details (serve/protocol.py)."""

from __future__ import annotations

import json

import pytest

from qwen3_aot.serve.protocol import sse_event


def test_sse_events_survive_line_readers_that_split_on_unicode_line_ends():
    try:  # the line reader of the clients the suite installs (openai brings httpx2, the same API)
        import httpx
    except ImportError:
        httpx = pytest.importorskip("httpx2")
    text = "a\u2028b\u2029c\x85d\né"  # what a model may write; \n JSON escapes by itself
    event = sse_event({"choices": [{"text": text}]})
    assert event.startswith("data: ") and event.endswith("\n\n")
    lines = list(httpx.Response(200, content=event.encode()).iter_lines())  # a client's reader
    assert [line for line in lines if line] == [event[:-2]]
    assert json.loads(lines[0][len("data: "):]) == {"choices": [{"text": text}]}
    assert "é" in event  # text stays UTF-8, not \\u escapes
