"""guidellm (vLLM's load generator) as a real client: its synthetic-data benchmark, four streams
at once against the tiny server on 127.0.0.1 for a bounded number of requests; every request
completes with the output length it asked for, and each streamed output equals the same request
sent again alone, not streamed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from suite_support import FIXTURE

pytest.importorskip("guidellm")
pytestmark = [pytest.mark.xdist_group("tiny_server"), pytest.mark.deadline(240)]
REQUESTS, STREAMS, PROMPT_TOKENS, OUTPUT_TOKENS = 16, 4, 48, 16


def run_guidellm(target: str, folder) -> dict:
    """`guidellm run` with a scenario file: synthetic prompts of PROMPT_TOKENS through the
    fixture's tokenizer, greedy (its `extras` join every request's body), its JSON report."""
    report = folder / "report.json"
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": target, "model": "tiny", "request_format": "/v1/completions",
                    "extras": {"body": {"temperature": 0}}},
        "profile": {"kind": "concurrent", "streams": STREAMS},
        "tokenizer": {"kind": "huggingface_auto", "model": str(FIXTURE)},
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
    return json.loads(report.read_text())


def test_guidellm_benchmark_completes_every_request_as_each_alone(tiny_server, tmp_path):
    benchmark, = run_guidellm(tiny_server.base, tmp_path)["benchmarks"]
    done = benchmark["requests"]
    assert not done["errored"] and not done["incomplete"] and len(done["successful"]) == REQUESTS
    assert benchmark["config"]["strategy"]["streams"] == STREAMS
    for r in done["successful"]:
        body = json.loads(r["request_args"])["body"]
        assert body["stream"] and body["max_tokens"] == OUTPUT_TOKENS and body["temperature"] == 0
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        status, alone = tiny_server.post("/v1/completions", body)
        assert status == 200
        assert r["output"] == alone["choices"][0]["text"]
        assert (r["prompt_tokens"], r["output_tokens"]) == (alone["usage"]["prompt_tokens"], OUTPUT_TOKENS)
        assert r["prompt_tokens"] == PROMPT_TOKENS  # guidellm sized its synthetic text with the same tokenizer
