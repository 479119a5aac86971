"""What the loop and its callers pass each other, in one process or across two: a caller's
Submission, the Outputs the loop hands it, the loop's stats and what it tells of its core;
and the loop's interface (`Loop`), which the Engine and its streams are written against."""

from __future__ import annotations

import dataclasses
from pathlib import Path
import threading
from typing import Callable, Protocol

import torch

from qwen3_aot.runtime.core.request import Prompt, Request
from qwen3_aot.runtime.core.sampling_params import Completion, SamplingParams
from qwen3_aot.runtime.text.tokenizer import Tokenizer


@dataclasses.dataclass
class Output:
    """What one step gave one request (see the module docstring)."""
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] | None = None
    completion: Completion | None = None  # set on the request's last Output
    error: BaseException | None = None    # the loop failed: no more Outputs come

    @property
    def last(self) -> bool:
        """No Output comes after this one for its request."""
        return self.completion is not None or self.error is not None


@dataclasses.dataclass
class Submission:
    """A request and where its Outputs go; `published`: how many of its output tokens went.
    `final_only`: one Output, at the end: a caller that waits for the Completion alone is woken
    once, not every step (each wake-up takes the GIL from the loop thread)."""
    request: Request
    put: Callable[[Output], None]
    final_only: bool = False
    published: int = 0


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot taken by the loop after each step and command, before the step's Outputs
    go out (a caller that has seen its request end sees the blocks it freed)."""
    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0          # blocks that can be handed out (the reserved one not counted)
    num_free_blocks: int = 0
    num_preemptions: int = 0     # since load
    prompt_tokens: int = 0       # of requests admitted since load
    generation_tokens: int = 0   # taken since load
    num_steps: int = 0
    prefix_cache_queries: int = 0  # tokens of joining sequences looked up in the prefix cache since load (vLLM's name)
    prefix_cache_hits: int = 0     # of those, the tokens found there
    num_cached_blocks: int = 0     # blocks findable by their content now


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """What an Engine tells its callers about its core, in whichever process the core runs."""
    artifact: Path
    config: dict
    device: torch.device
    max_model_len: int
    block_size: int
    cache_capacity: int  # the most tokens one sequence can hold
    load_seconds: dict[str, float]  # where the core's start-up went, part by part (EngineCore.load_seconds)


class Loop(Protocol):
    """The one owner of an engine core, fed by callers in any thread: EngineLoop (a thread of
    this process, service/loop.py) and ProcessLoop (that loop in a child process,
    service/engine_process.py)."""

    info: EngineInfo
    tokenizer: Tokenizer
    stats: EngineStats          # as of the loop's last step or command
    thread: threading.Thread    # alive while the loop serves

    def make_request(self, prompt: Prompt, params: SamplingParams | None) -> Request:
        """Check a prompt and its parameters (our error if bad) and make its request."""

    def submit(self, sub: Submission) -> None:
        """Queue a request; its Outputs go to `sub.put`."""

    def abort(self, sub: Submission) -> None:
        """Cancel a submitted request; a no-op once it ended."""

    def stop(self, timeout: float = 30.0) -> None:
        """End the loop (requests in flight end as aborted); idempotent."""
