"""Qwen3 compiled ahead of time: custom ops, the separated model, build and runtime."""

from qwen3_aot.errors import Qwen3AotError

__all__ = ["Qwen3AotError"]
__version__ = "0.1.0"
