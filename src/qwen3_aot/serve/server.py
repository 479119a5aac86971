"""Running the app: load the engine, serve until SIGTERM or SIGINT, then shut down gracefully.

On a signal uvicorn stops accepting connections and waits up to `grace_s` for the requests in
flight, then cancels the rest (which aborts their engine requests); the engine is closed last.
uvicorn re-raises the signal once it has shut down, which would end the process with the
signal's status: the handlers installed here take that re-raise, so a graceful stop exits 0."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import uvicorn

from qwen3_aot.serve.app import build_app

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run(artifact: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        served_model_name: str | None = None, max_queue: int = 1024, max_request_bytes: int | None = None,
        grace_s: float = 10.0, device: str | None = None, engine_process: bool = True,
        **engine_options: Any) -> None:
    """Serve `artifact` over HTTP until a signal stops it. `engine_options` go to runtime.load;
    max_queue and max_request_bytes to build_app.
    engine_process: the engine in a process of its own (runtime/service/engine_process.py): the event
    loop serving hundreds of streams would otherwise hold the GIL the engine's loop needs."""
    from qwen3_aot import runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # the pt2 graph: the continuously batched, thread- and asyncio-safe Engine (an ONNX-only
    # artifact gets load's error saying to rebuild it with --format pt2)
    with runtime.load(artifact, device=device, format="pt2", engine_process=engine_process,
                      **engine_options) as engine:
        app = build_app(engine, served_model_name or Path(artifact).resolve().name, api_key=api_key,
                        max_queue=max_queue, max_request_bytes=max_request_bytes)
        # access_log off: the app logs one line per request itself, with its tokens and timings
        config = uvicorn.Config(app, host=host, port=port, access_log=False, timeout_graceful_shutdown=grace_s,
                                log_level="info")
        for sig in SIGNALS:
            signal.signal(sig, _after_shutdown)
        uvicorn.Server(config).run()


def _after_shutdown(sig: int, frame: object) -> None:
    logging.getLogger("qwen3_aot.serve").info("stopped by %s", signal.Signals(sig).name)
