"""The server under a hostile client (issue 34), on the real-tokenizer artifact (Qwen's BPE, a
1,024-token context): oversized bodies, prompts and counts are refused before any work with a
status and a message naming the limit; a big prompt being tokenized does not hold up small
requests; memory comes back after abusive requests; and the server then serves and exits 0.
One server for the module, its requests sent one at a time unless a test says otherwise."""

from __future__ import annotations

import json
import random
import re
import signal
import statistics
import threading
import time

import pytest
from serving import running

from qwen3_aot.serve.limits import MAX_N, MAX_PROMPTS, MAX_STOP, MAX_STOP_CHARS, ROLES

pytestmark = pytest.mark.xdist_group("qwen_artifact")  # one pytest-xdist worker builds the real-tokenizer artifact
MAX_QUEUE = 8
ORDINARY = {"prompt": "The cat sat on", "max_tokens": 2, "temperature": 0}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(qwen_artifact, tmp_path_factory):
    # the default --max-request-bytes: the 413 test reads it from the server's own message
    with running(qwen_artifact, tmp_path_factory.mktemp("serve") / "hostile.log", "--served-model-name", "qwen",
                 "--max-queue", str(MAX_QUEUE)) as s:
        yield s


@pytest.fixture(scope="module")
def prompt_bytes(qwen_artifact) -> int:
    """The most UTF-8 bytes a text prompt may have, worked out here from `tokenizers` itself:
    1,024 tokens of the longest token's text, 3 times over for NFC (which can compose 9 bytes
    of Hangul jamo into 3)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(qwen_artifact / "tokenizer.json"))
    assert json.loads(tok.to_str())["normalizer"] == {"type": "NFC"}
    size = tok.get_vocab_size(with_added_tokens=True)
    longest = max(len(tok.decode([i], skip_special_tokens=False).encode()) for i in range(size))
    return 3 * longest * json.loads((qwen_artifact / "manifest.json").read_text())["limits"]["max_model_len"]


def post(server, path: str, body: dict | bytes, chunked: bool = False) -> tuple[int, dict, float]:
    """Status, JSON reply and seconds of one request on a connection of its own."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    c = server.connection()
    start = time.perf_counter()
    try:
        if chunked:
            c.request("POST", path, (data[i:i + 65536] for i in range(0, len(data), 65536)),
                      {"Content-Type": "application/json"}, encode_chunked=True)
        else:
            c.request("POST", path, data, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read()), time.perf_counter() - start
    finally:
        c.close()


def refused(server, path: str, body: dict | bytes, status: int = 400, chunked: bool = False) -> str:
    """The message of a refusal with `status`, in OpenAI's error JSON."""
    got, reply, _ = post(server, path, body, chunked)
    assert got == status and reply["error"]["code"] == status, reply
    return reply["error"]["message"]


def served(server) -> None:
    status, reply, _ = post(server, COMPLETIONS, ORDINARY)
    assert status == 200 and reply["usage"]["completion_tokens"] == 2, reply


def digits(n: int) -> str:
    """n digits: one token each in Qwen's BPE, the slowest text to tokenize per byte."""
    return "".join(random.choice("0123456789") for _ in range(n))


def rss_mb(server) -> float:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024


@pytest.mark.deadline(90)
def test_resident_memory_returns_after_abusive_requests(server, prompt_bytes):
    """Tokenizing a big prompt allocates tens of MB that glibc kept after they were freed
    (+73 MB for one 393 KB prompt, and as much again for 100,000 chat messages parsed). First
    in the module: once a process has kept that memory, later big requests reuse it, and a
    baseline taken after them would hide the growth."""
    for _ in range(20):
        served(server)
    before = rss_mb(server)
    refused(server, COMPLETIONS, b"x" * (10 << 20), 413)
    refused(server, COMPLETIONS, {"prompt": "a" * (prompt_bytes * 4)})
    for _ in range(2):
        refused(server, COMPLETIONS, {"prompt": digits(prompt_bytes)})
    refused(server, COMPLETIONS, {"prompt": [5] * 500_000})
    refused(server, CHAT, {"messages": [{"role": "user", "content": "hi"}] * 100_000})
    refused(server, CHAT, {"messages": [{"role": "user", "content": digits(prompt_bytes // 2)}]})
    after = rss_mb(server)
    for _ in range(100):
        served(server)
    settled = rss_mb(server)
    print(f"server RSS: {before:.0f} MB before, {after:.0f} MB after the abusive requests, {settled:.0f} MB after "
          "100 ordinary ones")
    assert settled < before + 32, f"{before:.0f} MB before, {settled:.0f} MB after"


def test_a_body_over_the_limit_gets_413_before_it_is_parsed(server, prompt_bytes):
    message = refused(server, COMPLETIONS, b"x" * (5 << 20), 413)  # not JSON: never parsed
    limit = int(re.search(r"--max-request-bytes \((\d+)\)", message).group(1))
    assert limit > prompt_bytes, "the default fits a context's worth of prompt with room"
    padded = json.dumps(ORDINARY).encode()
    padded += b" " * (limit - len(padded))  # JSON allows trailing whitespace: exactly the limit
    status, reply, _ = post(server, COMPLETIONS, padded)
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    assert f"has {limit + 1} bytes" in refused(server, COMPLETIONS, padded + b" ", 413)
    assert f"at least {limit + 1} bytes" in refused(server, COMPLETIONS, padded + b" ", 413, chunked=True)
    served(server)


def test_a_prompt_longer_in_bytes_than_the_context_holds_is_refused_without_tokenizing(server, prompt_bytes):
    status, reply, tokenized_s = post(server, COMPLETIONS, {"prompt": digits(prompt_bytes), "max_tokens": 2})
    assert status == 400 and f"({prompt_bytes} tokens) fills the context" in reply["error"]["message"]
    too_long = {"prompt": digits(prompt_bytes + 1), "max_tokens": 2}
    start = time.perf_counter()
    message = refused(server, COMPLETIONS, too_long)
    refused_s = time.perf_counter() - start
    assert f"{prompt_bytes + 1} bytes of UTF-8" in message and "shorten it" in message
    assert refused_s < tokenized_s / 4, f"refused in {refused_s:.3f} s, tokenized in {tokenized_s:.3f} s"
    cjk = "猫" * (prompt_bytes // 3 + 1)  # bytes, not characters, count
    assert f"{len(cjk.encode())} bytes of UTF-8" in refused(server, COMPLETIONS, {"prompt": cjk})
    chat = {"messages": [{"role": "user", "content": digits(prompt_bytes)}], "max_tokens": 2}
    assert "bytes of UTF-8" in refused(server, CHAT, chat)  # the rendered prompt: the content and more
    served(server)


@pytest.mark.parametrize("path, body, says", [
    (COMPLETIONS, {**ORDINARY, "n": MAX_N + 1}, f"limit of {MAX_N} choices"),
    (COMPLETIONS, {**ORDINARY, "n": MAX_QUEUE + 1}, f"too large: it asks for {MAX_QUEUE + 1} generations"),
    (COMPLETIONS, {**ORDINARY, "prompt": ["hi"] * (MAX_PROMPTS + 1)}, f"limit of {MAX_PROMPTS} per request"),
    (COMPLETIONS, {**ORDINARY, "prompt": ["hi"] * 3, "n": 3}, "too large: it asks for 9 generations"),
    (COMPLETIONS, {**ORDINARY, "prompt": [5] * 1024}, "(1024 tokens) fills the context (1024 tokens)"),
    (COMPLETIONS, {**ORDINARY, "stop": ["x"] * (MAX_STOP + 1)}, f"limit of {MAX_STOP}"),
    (COMPLETIONS, {**ORDINARY, "stop": "x" * (MAX_STOP_CHARS + 1)}, f"limit of {MAX_STOP_CHARS}"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}] * 1025}, "1025 messages is more than this server's "
                                                                        "limit of 1024"),
    (CHAT, {"messages": [{"role": "system<|im_end|>", "content": "hi"}]}, "role 'system<|im_end|>' is not a role"),
    (CHAT, {"messages": [{"role": "function", "content": "hi"}]}, "role 'function'"),
], ids=["n", "n over the queue", "prompts", "prompts times n over the queue", "prompt ids", "stop strings",
        "stop length", "messages", "role with control tokens", "role function"])
def test_each_limit_gets_a_400_naming_it_then_a_good_request_is_served(server, path, body, says):
    message = refused(server, path, body)
    assert says in message, message
    served(server)


def test_requests_at_the_limits_are_served(server):
    at_limits = {**ORDINARY, "n": MAX_QUEUE, "stop": ["x" * MAX_STOP_CHARS] * MAX_STOP}
    status, reply, _ = post(server, COMPLETIONS, at_limits)
    assert status == 200 and len(reply["choices"]) == MAX_QUEUE, reply
    every_role = [{"role": r, "content": "hi"} for r in ROLES] + [{"role": "user", "content": "and?"}]
    status, reply, _ = post(server, CHAT, {"messages": every_role, "max_tokens": 2})
    assert status == 200 and reply["usage"]["completion_tokens"] == 2, reply


@pytest.mark.deadline(90)
def test_small_requests_stay_fast_while_a_big_prompt_is_tokenized(server, prompt_bytes):
    """The big prompts (legal by their bytes, tokenized, then refused for their 393,216 tokens)
    take about a second each to tokenize here; on the event loop, the small requests sent
    meanwhile waited that long (median 1.2 s against 0.04 s alone), in a worker thread they
    take a small multiple of their time alone (0.05 s against 0.03 s)."""
    big = [digits(prompt_bytes) for _ in range(2)]
    alone = [post(server, COMPLETIONS, ORDINARY)[2] for _ in range(15)]
    answers = []
    hostile = threading.Thread(target=lambda: answers.extend(post(server, COMPLETIONS, {"prompt": p}) for p in big))
    hostile.start()
    during = []
    while hostile.is_alive():
        status, _, seconds = post(server, COMPLETIONS, ORDINARY)
        assert status == 200
        during.append(seconds)
    hostile.join()
    assert [(s, "fills the context" in r["error"]["message"]) for s, r, _ in answers] == [(400, True)] * 2
    bound = max(8 * statistics.median(alone), 0.2)  # 0.2 s: scheduling noise on 2 busy cores
    assert during and statistics.median(during) < bound, (
        f"small requests took {statistics.median(during):.3f} s (median of {len(during)}) beside the big prompts, "
        f"{statistics.median(alone):.3f} s alone")


def test_then_an_ordinary_request_is_served_and_sigterm_exits_0(server):
    served(server)
    assert server.stop(signal.SIGTERM) == 0
