"""guidellm (vLLM's load generator) as a real client: its synthetic-data benchmark, four streams
at once against a server on 127.0.0.1 for a bounded number of requests, completions on the tiny
fixture and chat (guidellm's default) on the Qwen-tokenizer artifact; every request completes
with the output length it asked for, and each streamed output equals the same request sent
again alone, not streamed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from suite_support import FIXTURE

pytest.importorskip("guidellm")
pytestmark = pytest.mark.deadline(240)
REQUESTS, STREAMS, PROMPT_TOKENS, OUTPUT_TOKENS = 16, 4, 48, 16


def run_guidellm(target: str, model: str, route: str, tokenizer, folder) -> list[dict]:
    """`guidellm run` with a scenario file: synthetic prompts of PROMPT_TOKENS through the
    checkpoint's tokenizer, greedy (its `extras` join every request's body); the requests of its
    one benchmark, each checked to have completed."""
    report = folder / "report.json"
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": target, "model": model, "request_format": route,
                    "extras": {"body": {"temperature": 0}}},
        "profile": {"kind": "concurrent", "streams": STREAMS},
        "tokenizer": {"kind": "huggingface_auto", "model": str(tokenizer)},
        "data": [{"kind": "synthetic_text", "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS}],
        "constraints": [{"kind": "max_requests", "count": REQUESTS}],
        "outputs": [{"kind": "json", "path": str(report)}],
    }}
    (folder / "scenario.json").write_text(json.dumps(scenario))
    # the tokenizer is a local folder: nothing to fetch (CI reaches no model hub)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(folder)}
    p = subprocess.run([sys.executable, "-m", "guidellm", "run", "-c", str(folder / "scenario.json"),
                        "--disable-console"], capture_output=True, text=True, timeout=200, env=env, cwd=folder)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    benchmark, = json.loads(report.read_text())["benchmarks"]
    assert benchmark["config"]["strategy"]["streams"] == STREAMS
    done = benchmark["requests"]
    assert not done["errored"] and not done["incomplete"] and len(done["successful"]) == REQUESTS
    return done["successful"]


def alone(server, route: str, r: dict) -> dict:
    """The body guidellm sent for request r, sent again by itself and not streamed."""
    body = json.loads(r["request_args"])["body"]
    limit = body.get("max_tokens", body.get("max_completion_tokens"))  # chat: OpenAI's newer name
    assert body["stream"] and limit == OUTPUT_TOKENS and body["temperature"] == 0
    status, answer = server.post(route, {k: v for k, v in body.items() if k not in ("stream", "stream_options")})
    assert status == 200, answer
    assert (r["prompt_tokens"], r["output_tokens"]) == (answer["usage"]["prompt_tokens"], OUTPUT_TOKENS)
    return answer


@pytest.mark.xdist_group("tiny_server")
def test_guidellm_completions_complete_every_request_as_each_alone(tiny_server, tmp_path):
    for r in run_guidellm(tiny_server.base, "tiny", "/v1/completions", FIXTURE, tmp_path):
        assert r["output"] == alone(tiny_server, "/v1/completions", r)["choices"][0]["text"]
        assert r["prompt_tokens"] == PROMPT_TOKENS  # guidellm sized its synthetic text with the same tokenizer


@pytest.mark.xdist_group("qwen_artifact")
def test_guidellm_chat_completes_every_request_as_each_alone(qwen_server, qwen_checkpoint, tmp_path):
    """Chat through Qwen3's template (thinking on): guidellm keeps the reasoning apart as the
    server streams it."""
    for r in run_guidellm(qwen_server.base, "qwen", "/v1/chat/completions", qwen_checkpoint, tmp_path):
        message = alone(qwen_server, "/v1/chat/completions", r)["choices"][0]["message"]
        assert (r["output"] or None, r["reasoning_output"]) == (message["content"] or None,
                                                                message.get("reasoning_content"))
