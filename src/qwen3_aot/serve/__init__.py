"""The OpenAI-compatible HTTP server over an artifact (`qwen3-aot serve ARTIFACT`), on FastAPI
and uvicorn: the `serve` extra (`pip install 'qwen3-aot[serve]'`). The core package never
imports this one, so the runtime stays lean."""

from qwen3_aot.serve.app import build_app
from qwen3_aot.serve.server import run

__all__ = ["build_app", "run"]
