"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health
and /metrics, over one engine shared by every request.

Errors come back in OpenAI's JSON: our Qwen3AotError and pydantic's validation errors as 400
(not FastAPI's 422: vLLM does the same), a wrong key 401, an unknown model 404, a full queue
429 at once. Every request, streamed or not, runs through a Generation, so a client that goes
away aborts its engine requests. One log line per request, at info level, when it ends.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.text.reasoning import ReasoningSplitter, may_think, opens_reasoning, split_reasoning
from qwen3_aot.runtime.core.sampling_params import Completion
from qwen3_aot.runtime.service.engine import Engine
from qwen3_aot.serve import protocol, tools as structured
from qwen3_aot.serve.generation import ClientGone, Event, Generation
from qwen3_aot.serve.metrics import CONTENT_TYPE, Metrics
from qwen3_aot.serve.protocol import ChatRequest, CompletionRequest, Prompt, Response as Meta

log = logging.getLogger("qwen3_aot.serve")
DONE = "data: [DONE]\n\n"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class _State:
    engine: Engine
    model: str
    api_key: str | None
    max_queue: int
    metrics: Metrics
    text: protocol.TokenText
    in_flight: int = 0  # engine requests admitted and not yet ended


def build_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_queue: int = 1024) -> FastAPI:
    """The app over a loaded engine, serving it as `model_name`. `max_queue`: the most engine
    requests (a prompt times n) running or waiting at once; more get 429."""
    app = FastAPI(title="qwen3-aot", docs_url=None, redoc_url=None)
    st = _State(engine, model_name, api_key, max_queue, Metrics(engine), protocol.TokenText(engine.tokenizer))
    _add_error_handlers(app, st)

    async def authorized(request: Request) -> None:
        if st.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {st.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the server's --api-key as 'Authorization: Bearer KEY'.")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.running else 503)  # 503: the engine's loop has ended

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(st.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": st.model, "object": "model", "created": 0, "owned_by": "qwen3-aot",
                                            "max_model_len": engine.max_model_len}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check()
        _check_model(st, body.model)
        prompts = body.prompts()
        constraint = structured.requested_constraint(body, reasoning=False)  # a raw prompt: constrained from its start
        jobs = [(p, structured.constrained(body.sampling(_max_tokens(st, body.max_tokens, p), body.logprobs is not None,
                                                         j), constraint))
                for p in prompts for j in range(body.n)]
        meta = protocol.Response.new("cmpl", st.model, "text_completion")
        gen = _start(st, jobs, request)
        if body.stream:
            return _sse(_stream_completion(st, gen, meta, body), st, gen, meta, request)
        done = await _collect(st, gen, meta, request)
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                    "logprobs": st.text.completion_logprobs(c.token_ids, c.logprobs) if c.logprobs is not None
                    else None} for i, c in enumerate(done)]
        return JSONResponse(meta.body(choices, usage=_usage(done, body.n)))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, request: Request) -> Response:
        body.check()
        _check_model(st, body.model)
        tools = structured.ChatTools.of(body.tools, body.tool_choice)
        kwargs = {**(body.chat_template_kwargs or {}), **({"tools": tools.tools} if tools.tools else {})}
        text = engine.apply_chat_template(body.template_messages(), add_generation_prompt=body.add_generation_prompt,
                                          **kwargs)
        ids = engine.tokenizer.encode(text)
        constraint = structured.chat_constraint(body, tools, may_think(text))
        jobs = [(ids, structured.constrained(body.sampling(_max_tokens(st, body.max_new_tokens, ids), body.logprobs, j),
                                             constraint)) for j in range(body.n)]
        meta = protocol.Response.new("chatcmpl", st.model, "chat.completion")
        thinking = opens_reasoning(text)  # the template opened a think block: the output starts inside it
        gen = _start(st, jobs, request)
        if body.stream:
            meta.object = "chat.completion.chunk"
            return _sse(_stream_chat(st, gen, meta, body, thinking, tools.parse), st, gen, meta, request)
        done = await _collect(st, gen, meta, request)
        choices = []
        for i, c in enumerate(done):
            reasoning, content = split_reasoning(c.text, in_reasoning=thinking)
            fields, finish = structured.message(content, c, tools.parse)
            choices.append({"index": i, "finish_reason": finish,
                            "message": {"role": "assistant", **fields, "reasoning_content": reasoning},
                            "logprobs": st.text.chat_logprobs(c.token_ids, c.logprobs) if c.logprobs is not None
                            else None})
        return JSONResponse(meta.body(choices, usage=_usage(done, 1)))

    return app


# ---- helpers of the routes ----

def _check_model(st: _State, model: str | None) -> None:
    if model is not None and model != st.model:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {st.model!r}.", "model")


def _max_tokens(st: _State, asked: int | None, prompt: Prompt) -> int:
    """What was asked, else the rest of the context (vLLM's default)."""
    if asked is not None:
        return asked
    n = len(st.engine.tokenizer.encode(prompt)) if isinstance(prompt, str) else len(prompt)
    if n >= st.engine.max_model_len:
        raise Qwen3AotError(f"the prompt ({n} tokens) fills the context ({st.engine.max_model_len} tokens); "
                            "shorten it.")
    return st.engine.max_model_len - n


def _start(st: _State, jobs: list, request: Request) -> Generation:
    if st.in_flight + len(jobs) > st.max_queue:
        raise ApiError(429, f"the server is full ({st.in_flight} requests running or waiting, its --max-queue is "
                            f"{st.max_queue}); retry later.")
    gen = Generation(st.engine, jobs, st.metrics, request.receive, on_done=lambda: _one_done(st))
    st.in_flight += len(jobs)
    return gen


def _one_done(st: _State) -> None:
    st.in_flight -= 1


def _usage(done: list[Completion], n: int) -> dict:
    """A prompt counts once however many choices it has (OpenAI's n)."""
    return protocol.usage(sum(c.prompt_tokens for c in done[::n]), sum(c.output_tokens for c in done))


async def _collect(st: _State, gen: Generation, meta: Meta, request: Request) -> list[Completion]:
    try:
        done = await gen.collect()
    except ClientGone:
        _log_request(st, request, meta.id, "client gone", gen)
        raise
    _log_request(st, request, meta.id, 200, gen)
    return done


def _sse(events: AsyncIterator[dict], st: _State, gen: Generation, meta: Meta, request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        outcome: int | str = 200
        try:
            async for chunk in events:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except ClientGone:
            outcome = "client gone"
            return
        except (asyncio.CancelledError, GeneratorExit):  # Starlette saw the disconnect, or shutdown's grace ran out
            outcome = "cancelled"
            raise
        except Exception as e:  # the headers went out: the error goes in the stream, as vLLM does
            outcome = 500
            log.exception("%s: the engine failed mid-stream", meta.id)
            yield f"data: {json.dumps(protocol.error_body(str(e), 500))}\n\n"
        finally:
            gen.cancel()  # no await here: Starlette may be cancelling this generator
            _log_request(st, request, meta.id, outcome, gen)
        yield DONE

    return StreamingResponse(body(), media_type="text/event-stream")


async def _stream_completion(st: _State, gen: Generation, meta: Meta, body: CompletionRequest) -> AsyncIterator[dict]:
    extra = {"usage": None} if body.include_usage else {}
    pending = _Pending(body.n * len(body.prompts()))
    offsets = [0] * len(pending.ids)  # where each choice's text so far ends, for text_offset
    async for e in gen.events():
        pending.add(e)
        if not (e.text or e.completion):
            continue
        logprobs = None
        if e.logprobs is not None:
            logprobs = st.text.completion_logprobs(*pending.pop(e.index), offsets[e.index])
            offsets[e.index] += sum(map(len, logprobs["tokens"]))
        yield meta.body([{"index": e.index, "text": e.text, "logprobs": logprobs, "finish_reason": _finish(e)}],
                        **extra)
    if body.include_usage:
        yield meta.body([], usage=_usage(gen.completions, body.n))


class _Pending:
    """Each choice's tokens and logprobs not yet sent (a piece of text can lag its tokens)."""

    def __init__(self, choices: int) -> None:
        self.ids: list[list[int]] = [[] for _ in range(choices)]
        self.logprobs: list[list[float]] = [[] for _ in range(choices)]

    def add(self, e: Event) -> None:
        self.ids[e.index] += e.token_ids
        self.logprobs[e.index] += e.logprobs or []

    def pop(self, index: int) -> tuple[list[int], list[float]]:
        out = self.ids[index], self.logprobs[index]
        self.ids[index], self.logprobs[index] = [], []
        return out


async def _stream_chat(st: _State, gen: Generation, meta: Meta, body: ChatRequest,
                       thinking: bool, parse_tools: bool) -> AsyncIterator[dict]:
    extra = {"usage": None} if body.include_usage else {}
    for i in range(body.n):
        yield meta.body([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}], **extra)
    splitters = [ReasoningSplitter(in_reasoning=thinking) for _ in range(body.n)]
    calls = [structured.StreamedCalls(parse_tools) for _ in range(body.n)]
    pending = _Pending(body.n)
    async for e in gen.events():
        pending.add(e)
        reasoning, content = splitters[e.index].push(e.text)
        if e.completion is not None:
            tail = splitters[e.index].finish()
            reasoning, content = reasoning + tail[0], content + tail[1]
        answer = calls[e.index].push(content, last=e.completion is not None)  # tool calls parsed out
        if not (reasoning or answer or e.completion):
            continue
        logprobs = st.text.chat_logprobs(*pending.pop(e.index)) if e.logprobs is not None else None
        deltas = answer or [{}]
        if reasoning:  # with the answer's first text in one chunk, as before tool calls were parsed
            deltas = [{"reasoning_content": reasoning, **deltas[0]}] + deltas[1:] if "content" in deltas[0] or \
                not deltas[0] else [{"reasoning_content": reasoning}] + deltas
        finish = _finish(e)
        if finish is not None and calls[e.index].made_calls:
            finish = "tool_calls"
        for k, delta in enumerate(deltas):
            last = k == len(deltas) - 1
            yield meta.body([{"index": e.index, "delta": delta, "logprobs": logprobs if k == 0 else None,
                              "finish_reason": finish if last else None}], **extra)
    if body.include_usage:
        yield meta.body([], usage=_usage(gen.completions, 1))


def _finish(e: Event) -> str | None:
    return None if e.completion is None else e.completion.finish_reason


def _log_request(st: _State, request: Request, rid: str, outcome: int | str, gen: Generation | None = None,
                 detail: str = "") -> None:
    st.metrics.requests.labels(request.url.path, str(outcome)).inc()
    if gen is None:
        log.info("%s %s %s: %s", request.method, request.url.path, outcome, detail)
        return
    done = [c for c in gen.completions if c is not None]
    ttft = "-" if gen.first_token_s is None else f"{gen.first_token_s:.3f}s"
    log.info("%s %s %s %s: %d requests, tokens in %d out %d, first token %s, total %.3fs", rid, request.method,
             request.url.path, outcome, len(gen.completions), sum(c.prompt_tokens for c in done),
             sum(c.output_tokens for c in done), ttft, time.perf_counter() - gen.arrival)


def _add_error_handlers(app: FastAPI, st: _State) -> None:
    def reply(request: Request, status: int, message: str, param: str | None = None) -> JSONResponse:
        _log_request(st, request, "-", status, detail=message)
        return JSONResponse(protocol.error_body(message, status, param), status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return reply(request, e.status, str(e), e.param)

    @app.exception_handler(Qwen3AotError)
    async def our_error(request: Request, e: Qwen3AotError) -> JSONResponse:
        return reply(request, 400, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        where = [".".join(str(x) for x in err["loc"][1:]) for err in errors]  # loc[0] is "body"
        message = "; ".join(f"{w or 'body'}: {err['msg']}" for w, err in zip(where, errors))
        return reply(request, 400, message, where[0] if where else None)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return reply(request, e.status_code, str(e.detail))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for a client that closed

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return reply(request, 500, f"internal error: {type(e).__name__}: {e}")
