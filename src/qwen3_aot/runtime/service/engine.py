"""The engine services share: prompts in, text out, from any number of threads and asyncio
tasks at once, all in one continuous batch.

Who owns what: the EngineCore (scheduler, paged KV cache, compiled forward, CUDA graphs,
sampler) belongs to the loop thread that `runtime.load` starts (runtime/service/loop.py), and
nothing else touches it; with `engine_process=True` that thread runs in a process of its own
(runtime/service/engine_process.py), so that the callers' Python never holds the GIL it needs.
Callers check and make their requests in their own thread (a bad one raises our error there,
and nothing is queued), submit them through the loop's command queue, and read text from a
Stream or AsyncStream (runtime/service/streams.py). A caller that wants the checking and
tokenizing apart from the streaming (a server does it off its event loop) calls
`make_request` and hands its Request to `stream` or `stream_async`: a prompt is then checked
and tokenized once. `close()`, leaving a `with` block, dropping the
engine or the interpreter's exit stops the loop and frees the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from typing import Any

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.service.messages import EngineStats, Loop
from qwen3_aot.runtime.core.request import Prompt, Request, pair_up
from qwen3_aot.runtime.core.sampling_params import Completion, SamplingParams
from qwen3_aot.runtime.service.streams import AsyncStream, Stream

EXIT_TIMEOUT_S = 5.0  # at interpreter exit, how long a step in progress may take to finish


class Engine:
    """Built by `qwen3_aot.runtime.load` around the loop that owns its core, in this process
    (EngineLoop) or another (ProcessLoop); thread-safe and asyncio-safe (see the module
    docstring)."""

    def __init__(self, loop: Loop) -> None:
        info = loop.info
        self.tokenizer, self.config, self.device = loop.tokenizer, info.config, info.device
        self.max_model_len, self.block_size = info.max_model_len, info.block_size
        self.cache_capacity = info.cache_capacity  # the most tokens one sequence can hold
        self._artifact = info.artifact
        self._loop = loop
        # Requests of make_request that a stream has taken: a second stream of one would submit
        # its sequence twice, which the loop cannot tell from two requests sharing their tokens
        self._streamed: weakref.WeakSet[Request] = weakref.WeakSet()
        self._streamed_lock = threading.Lock()
        # the finalizer holds the loop, not the engine: dropping the engine stops its loop
        self._stop = weakref.finalize(self, self._loop.stop, EXIT_TIMEOUT_S)

    # ---- text ----

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Completions of one prompt (text or token ids) or a list of them, in order; one
        SamplingParams for all or one per prompt. All are checked before any is submitted."""
        # final_only: the Completion is all a caller of generate sees, so it is woken once
        streams = [Stream(self._loop, self._request(p, s), final_only=True) for p, s in pair_up(prompts, sampling)]
        try:
            for s in streams:
                s.start()
            return [s.result() for s in streams]
        finally:  # an exception (or Ctrl-C) leaves no request of ours running
            for s in streams:
                s.close()

    def stream(self, prompt: Prompt | Request, sampling: SamplingParams | None = None) -> Stream:
        """Text pieces as they are generated; the prompt is checked now, submitted at the
        first read; closing or dropping the stream early aborts it. `prompt` may be a Request
        of `make_request` (then without `sampling`: its own are in it)."""
        return Stream(self._loop, self._request(prompt, sampling))

    def add_request(self, prompt: Prompt, sampling: SamplingParams | None = None) -> Stream:
        """Submit a request now; `stream.result()` waits for its Completion."""
        return self.stream(prompt, sampling).start()

    def abort(self, stream: Stream | AsyncStream) -> None:
        """Cancel a request (its blocks are freed); a no-op once it has ended. `stream.result()`
        then gives its Completion, finish_reason "abort"."""
        stream.cancel()

    async def generate_async(self, prompt: Prompt, sampling: SamplingParams | None = None) -> Completion:
        """The Completion of one prompt, awaited without blocking the event loop; a cancelled
        await aborts the request."""
        stream = AsyncStream(self._loop, self._request(prompt, sampling), final_only=True)
        try:
            return await stream.result()
        finally:
            stream.close()

    def stream_async(self, prompt: Prompt | Request, sampling: SamplingParams | None = None) -> AsyncStream:
        """As `stream`, an async iterator of text pieces (`await stream.aclose()` aborts); a
        Request of `make_request` too."""
        return AsyncStream(self._loop, self._request(prompt, sampling))

    def make_request(self, prompt: Prompt, sampling: SamplingParams | None = None) -> Request:
        """Check a prompt and its parameters and make its request, tokenizing a text prompt (our
        error if bad); nothing is submitted until `stream(request)` or `stream_async(request)`
        is read, and a request streams once. Runs in the caller's thread: an event loop calls
        it through a worker thread when there is text to tokenize, which takes a while (the
        server makes prompts of a few token ids on the loop itself: serve/app.py)."""
        return self._loop.make_request(prompt, sampling)

    # ---- the checkpoint's sampling defaults ----

    @functools.cached_property
    def generation_defaults(self) -> dict[str, Any]:
        """What the artifact's generation_config.json sets (runtime/core/generation_defaults.py):
        defaults of temperature, top_k, top_p, min_p, repetition_penalty, and "max_tokens" (its
        max_new_tokens, a cap). The server applies them unless started with
        --generation-config none; in-process, `default_sampling_params` does."""
        from qwen3_aot.runtime.core.generation_defaults import generation_defaults

        return generation_defaults(self._artifact)

    def default_sampling_params(self, **fields: Any) -> SamplingParams:
        """SamplingParams(**fields) with the checkpoint's defaults for the fields not given
        (vLLM's LLM.get_default_sampling_params): `engine.generate(prompt,
        engine.default_sampling_params(max_tokens=200, seed=1))` samples as the checkpoint's
        authors recommend. max_tokens (given or 64) is capped by the file's max_new_tokens."""
        defaults = self.generation_defaults
        params = SamplingParams(**fields).with_defaults(defaults)
        cap = defaults.get("max_tokens")
        if cap is not None and params.max_tokens > cap:
            params = params.replace(max_tokens=cap)
        return params

    # ---- chat ----

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> str:
        """The artifact's own chat template rendered for `messages` (as transformers'
        apply_chat_template(..., tokenize=False) renders it); Qwen3's reads enable_thinking."""
        if self._chat_template is None:
            raise Qwen3AotError(f"{self._artifact} has no chat template (tokenizer_config.json's chat_template or "
                                "chat_template.jinja); rebuild it from a checkpoint that has one, or render the "
                                "prompt yourself and call generate.")
        return self._chat_template.render(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)

    def chat(self, messages: list[dict[str, Any]], sampling: SamplingParams | None = None, *,
             separate_reasoning: bool = False, tools: list[dict] | None = None, tool_choice: Any = None,
             **template_kwargs: Any) -> Completion:
        """generate() of the rendered chat prompt. separate_reasoning: Qwen3's thinking (the
        text between <think> and </think>) goes to `reasoning`, the answer alone to `text`.
        tools (OpenAI's function tools, rendered by the template) and tool_choice ("auto" by
        default, "none", "required" or {"type": "function", "function": {"name": ...}}): the
        answer's calls go to `tool_calls` and leave `text`; "required" and a named function
        constrain the answer to calls. A `sampling.structured` constraint, like a forced call,
        applies after the thinking when the model thinks (StructuredOutput.reasoning)."""
        prompt, sampling, parse = self._chat_prompt(messages, sampling, tools, tool_choice, template_kwargs)
        return _chat_completion(self.generate(prompt, sampling)[0], prompt, separate_reasoning, parse)

    async def chat_async(self, messages: list[dict[str, Any]], sampling: SamplingParams | None = None, *,
                         separate_reasoning: bool = False, tools: list[dict] | None = None, tool_choice: Any = None,
                         **template_kwargs: Any) -> Completion:
        prompt, sampling, parse = self._chat_prompt(messages, sampling, tools, tool_choice, template_kwargs)
        return _chat_completion(await self.generate_async(prompt, sampling), prompt, separate_reasoning, parse)

    def _chat_prompt(self, messages: list[dict[str, Any]], sampling: SamplingParams | None, tools: Any,
                     tool_choice: Any, template_kwargs: dict) -> tuple[str, SamplingParams | None, bool]:
        """The prompt, the sampling with its constraint (a forced call's, or the caller's with
        the thinking rule of this prompt), and whether the answer is parsed for calls."""
        from qwen3_aot.runtime.text.reasoning import may_think
        from qwen3_aot.runtime.core.tool_grammar import tool_call_constraint
        from qwen3_aot.runtime.text.tool_calls import checked_tools

        tools, choice = checked_tools(tools, tool_choice)
        prompt = self.apply_chat_template(messages, **({"tools": tools} if tools else {}), **template_kwargs)
        thinks = may_think(prompt)
        params = sampling or SamplingParams()
        if choice not in (None, "auto", "none"):
            if params.structured is not None:
                raise Qwen3AotError(f"tool_choice {choice!r} constrains the answer to calls; leave "
                                    "sampling.structured out or use tool_choice 'auto'.")
            params = params.replace(structured=tool_call_constraint(tools, choice, thinks))
        elif params.structured is not None:
            params = params.replace(structured=dataclasses.replace(params.structured, reasoning=thinks))
        return prompt, params, choice not in (None, "none")

    @property
    def has_chat_template(self) -> bool:
        return self._chat_template is not None

    @functools.cached_property
    def _chat_template(self):
        from qwen3_aot.runtime.text.chat_template import ChatTemplate  # jinja2 only when chat is used

        return ChatTemplate.from_dir(self._artifact)

    # ---- state ----

    def stats(self) -> EngineStats:
        """Running and waiting requests, KV-cache blocks, preemptions, token counts and the
        prefix cache's queries, hits and blocks, as of the loop's last step or command."""
        return self._loop.stats

    @property
    def load_seconds(self) -> dict[str, float]:
        """Where the load's time went, part by part (EngineCore.load_seconds), for benchmarks."""
        return self._loop.info.load_seconds

    @property
    def num_free_blocks(self) -> int:
        return self._loop.stats.num_free_blocks

    @property
    def running(self) -> bool:
        """False once closed, or once its loop failed (every request then gets our error)."""
        return self._loop.thread.is_alive()

    def has_unfinished(self) -> bool:
        stats = self._loop.stats
        return stats.num_running + stats.num_waiting > 0

    def close(self) -> None:
        """Stop the loop (requests in flight end as aborted) and free the KV cache; idempotent."""
        self._stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, prompt: Prompt | Request, sampling: SamplingParams | None) -> Request:
        """A prompt's new request, or a Request of make_request not streamed before."""
        if not isinstance(prompt, Request):
            return self._loop.make_request(prompt, sampling)
        if sampling is not None:
            raise Qwen3AotError("a Request carries its own SamplingParams (given to make_request); pass it alone.")
        with self._streamed_lock:
            if prompt in self._streamed:
                raise Qwen3AotError("this Request was streamed already; a request streams once: make another "
                                    "with make_request.")
            self._streamed.add(prompt)
        return prompt


def _chat_completion(completion: Completion, prompt: str, separate_reasoning: bool, parse_tools: bool) -> Completion:
    from qwen3_aot.runtime.text.reasoning import opens_reasoning, split_reasoning
    from qwen3_aot.runtime.text.tool_calls import parse_tool_calls

    if not (separate_reasoning or parse_tools):
        return completion
    reasoning, answer = split_reasoning(completion.text, in_reasoning=opens_reasoning(prompt))
    thinking = completion.text[:len(completion.text) - len(answer)]  # the think block as written
    if parse_tools:
        content, calls = parse_tool_calls(answer)
        if calls:
            completion.tool_calls = calls
            answer = content or ""
    if separate_reasoning:
        completion.text, completion.reasoning = answer, reasoning
    else:  # the thinking stays in the text as written, the calls leave it
        completion.text = thinking + answer
    return completion
