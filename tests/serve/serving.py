"""Talking to a real `qwen3-aot serve` process: started on 127.0.0.1 and a free port, its
output in a log file, stopped by a signal; raw HTTP through http.client, and openai clients
that never retry (a retry would hide a 429 or a dropped request)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import openai

START_TIMEOUT_S = 90
CLIENT_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m qwen3_aot.cli serve ARTIFACT ...` in a subprocess, its output in a log file.
    One CPU thread: the tiny model gains nothing from more, and on a machine whose cores the other
    test worker keeps busy, extra threads made its speed swing sevenfold (timed tests failed)."""

    def __init__(self, artifact: Path, log: Path, *args: str) -> None:
        self.port, self.log = free_port(), log
        self._clients: dict[str, openai.OpenAI] = {}
        self.base = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "qwen3_aot.cli", "serve", str(artifact),
                                          "--port", str(self.port), *args], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if self.get("/health")[0] == 200:
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health in {START_TIMEOUT_S} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log.read_text()

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT_S)

    def get(self, path: str) -> tuple[int, str]:
        c = self.connection()
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode()
        finally:
            c.close()

    def post(self, path: str, body: dict | str, headers: dict | None = None) -> tuple[int, dict]:
        c = self.connection()
        try:
            c.request("POST", path, body if isinstance(body, str) else json.dumps(body),
                      {"Content-Type": "application/json", **(headers or {})})
            r = c.getresponse()
            return r.status, json.loads(r.read())
        finally:
            c.close()

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics, by name."""
        status, text = self.get("/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def client(self, api_key: str = "none") -> "openai.OpenAI":
        """One client a key for the server's life: making one costs about 50 ms of CPU (its httpx
        client builds an SSL context, though these connections are plain HTTP), and the tests ask
        for one a request."""
        if api_key not in self._clients:
            self._clients[api_key] = openai.OpenAI(base_url=self.base + "/v1", api_key=api_key,
                                                   timeout=CLIENT_TIMEOUT_S, max_retries=0)
        return self._clients[api_key]

    def async_client(self) -> "openai.AsyncOpenAI":
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key="none", timeout=CLIENT_TIMEOUT_S, max_retries=0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def running(artifact: Path, log: Path, *args: str) -> Iterator[Server]:
    server = Server(artifact, log, *args)
    try:
        yield server
    finally:
        server.stop()
