"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health
and /metrics, over one engine shared by every request.

Errors come back in OpenAI's JSON: our Qwen3AotError and pydantic's validation errors as 400
(not FastAPI's 422: vLLM does the same), a wrong key 401, an unknown model 404, a body over
--max-request-bytes 413, a full queue 429 at once. Every request, streamed or not, runs
through a Generation, so a client that goes away aborts its engine requests. One log line per
request, at info level, when it ends.

A request's way in: its limits are checked on the event loop (serve/limits.py: cheap checks of
sizes and counts), its place in the queue is taken, then its prompts are rendered, tokenized
and made into engine requests once, in a worker thread (`_prepare`): tokenizing a long prompt
takes a while, and on the event loop it would hold up every other request. Completions whose
prompts are a few token ids already are made on the event loop (`_ids_only`): nothing to
tokenize, and the thread's hand-offs cost more than the work. Bodies over
BIG_BODY_BYTES get two threads of their own, so that giant prompts neither take every worker
from ordinary requests nor hold more than two tokenizations' memory at once, and the memory
they leave freed is handed back to the system once they are answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from qwen3_aot.errors import Qwen3AotError
from qwen3_aot.runtime.core.request import Request as EngineRequest
from qwen3_aot.runtime.core.sampling_params import Completion
from qwen3_aot.runtime.core.generation_defaults import describe as describe_defaults
from qwen3_aot.runtime.service.engine import Engine
from qwen3_aot.runtime.text.reasoning import (
    ReasoningSplitter,
    may_think,
    opens_reasoning,
    split_reasoning,
)
from qwen3_aot.serve import protocol, tools as structured
from qwen3_aot.serve.generation import ClientGone, Event, Generation
from qwen3_aot.serve.limits import (
    BodyLimit,
    Limits,
    prompt_fills_context,
    release_freed_memory,
)
from qwen3_aot.serve.metrics import CONTENT_TYPE, Metrics
from qwen3_aot.serve.protocol import ChatRequest, CompletionRequest, Prompt
from qwen3_aot.serve.protocol import Response as Meta

log = logging.getLogger("qwen3_aot.serve")
DONE = "data: [DONE]\n\n"
BIG_BODY_BYTES = 64 << 10  # a body this large (or of unknown size) is prepared in the big requests' threads
INLINE_IDS = 16384  # token ids times n that a request made on the event loop may carry (`_ids_only`): ~2 ms
BIG_WORKERS = 2
T = TypeVar("T")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class _State:
    engine: Engine
    model: str
    api_key: str | None
    limits: Limits
    metrics: Metrics
    text: protocol.TokenText
    in_flight: int = 0  # engine requests admitted (from before their prompts are tokenized) and not yet ended
    defaults: dict = field(default_factory=dict)  # the checkpoint's sampling defaults in force, or {}
    big: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(BIG_WORKERS, "qwen3-aot-big-request"))


def build_app(engine: Engine, model_name: str, *, api_key: str | None = None, max_queue: int = 1024,
              max_request_bytes: int | None = None, generation_config: str = "auto") -> FastAPI:
    """The app over a loaded engine, serving it as `model_name`. `max_queue`: the most engine
    requests (a prompt times n) running or waiting at once; more get 429, a request of more
    than that alone 400. `max_request_bytes`: a larger body gets 413 (default:
    limits.default_max_request_bytes of the engine's context). generation_config: "auto"
    (vLLM's default) samples the fields a request leaves out as the artifact's
    generation_config.json says (temperature, top_k, top_p, min_p, repetition_penalty; its
    max_new_tokens caps max_tokens); "none": OpenAI's defaults."""
    if generation_config not in ("auto", "none"):
        raise Qwen3AotError(f"generation_config must be 'auto' or 'none', got {generation_config!r}.")
    defaults = engine.generation_defaults if generation_config == "auto" else {}
    log.info("sampling defaults for fields a request leaves out (--generation-config %s): %s", generation_config,
             describe_defaults(defaults))
    app = FastAPI(title="qwen3-aot", docs_url=None, redoc_url=None)
    limits = Limits.for_engine(engine, max_queue, max_request_bytes)
    st = _State(engine, model_name, api_key, limits, Metrics(engine), protocol.TokenText(engine.tokenizer))
    st.defaults = defaults
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes, big=BIG_BODY_BYTES,
                       after_big=lambda: st.big.submit(release_freed_memory))
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

    def model_card() -> dict:
        return {"id": st.model, "object": "model", "created": 0, "owned_by": "qwen3-aot",
                "max_model_len": engine.max_model_len}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str) -> dict:
        _check_model(st, model_id)
        return model_card()

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check()
        _check_model(st, body.model)
        _warn_ignored(body, request)
        prompts = body.prompts()
        st.limits.check_sampling(body.n, body.stop)
        st.limits.check_prompts(prompts)
        jobs = await _prepare(st, request, len(prompts) * body.n, _completion_requests, st, body, prompts,
                              inline=_ids_only(body, prompts, request))
        meta = protocol.Response.new("cmpl", st.model, "text_completion")
        gen = _start(st, jobs, request)
        if body.stream:
            return _sse(_stream_completion(st, gen, meta, body), st, gen, meta, request)
        done = await _collect(st, gen, meta, request)
        if body.scores_only:  # the one token taken is not part of the answer
            done = [dataclasses.replace(c, text="", token_ids=[], output_tokens=0, finish_reason="length",
                                        logprobs=None if c.logprobs is None else [],
                                        top_logprobs=None if c.top_logprobs is None else []) for c in done]
        choices = [_completion_choice(st, i, c, prompts[i // body.n] if body.echo else None)
                   for i, c in enumerate(done)]
        return JSONResponse(meta.body(choices, usage=_usage(done, body.n)))

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat(body: ChatRequest, request: Request) -> Response:
        body.check()
        _check_model(st, body.model)
        _warn_ignored(body, request)
        if not engine.has_chat_template:
            raise Qwen3AotError(f"the model {st.model!r} has no chat template, so /v1/chat/completions cannot render "
                                "messages: send the prompt text to /v1/completions, or rebuild the artifact from a "
                                "checkpoint whose tokenizer_config.json has a chat_template.")
        st.limits.check_sampling(body.n, body.stop)
        st.limits.check_messages(body.messages)
        tools = structured.ChatTools.of(body.tools, body.tool_choice)
        jobs, thinking = await _prepare(st, request, body.n, _chat_requests, st, body, tools)
        meta = protocol.Response.new("chatcmpl", st.model, "chat.completion")
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
                            "logprobs": st.text.chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs,
                                                              body.top_logprobs or 0)
                            if c.logprobs is not None else None})
        return JSONResponse(meta.body(choices, usage=_usage(done, body.n)))

    return app


# ---- helpers of the routes ----

def _check_model(st: _State, model: str | None) -> None:
    if model is not None and model != st.model:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {st.model!r}.", "model")


def _completion_choice(st: _State, index: int, c: Completion, echoed: Prompt | None) -> dict:
    """One choice of a completions response; `echoed`: the prompt, when echo asks for it first
    (its text, and with logprobs its tokens' logprobs, the first token's null)."""
    text, ids, lps, top = c.text, c.token_ids, c.logprobs, c.top_logprobs
    if echoed is not None:
        prompt_ids = st.engine.tokenizer.encode(echoed) if isinstance(echoed, str) else list(echoed)
        text = (echoed if isinstance(echoed, str) else st.engine.tokenizer.decode(prompt_ids)) + text
        if lps is not None:
            ids, lps = prompt_ids + ids, c.prompt_logprobs + lps
            top = None if top is None else c.prompt_top_logprobs + top
    logprobs = None if lps is None else st.text.completion_logprobs(ids, lps, top)
    return {"index": index, "text": text, "finish_reason": c.finish_reason, "logprobs": logprobs}


def _warn_ignored(body: protocol.CompletionRequest | protocol.ChatRequest, request: Request) -> None:
    """Fields this server does not know are ignored, and named in a warning (as vLLM does)."""
    ignored = body.ignored_fields()
    if ignored:
        log.warning("%s %s: the request's fields %s are not known to this server and were ignored", request.method,
                    request.url.path, ", ".join(ignored))


async def _prepare(st: _State, request: Request, count: int, make: Callable[..., T], *args: Any,
                   inline: bool = False) -> T:
    """`make(*args)` in a worker thread (on the event loop if `inline`), once `count` places in
    the queue are taken (400 if the queue can never hold them, 429 if it cannot now); they are
    given back if it fails."""
    st.limits.check_count(count)
    if st.in_flight + count > st.limits.max_queue:
        raise ApiError(429, f"the server is full ({st.in_flight} requests running or waiting, its --max-queue is "
                            f"{st.limits.max_queue}); retry later.")
    st.in_flight += count
    try:
        if inline:
            return make(*args)
        size = request.headers.get("content-length", "")
        executor = None if size.isdigit() and int(size) <= BIG_BODY_BYTES else st.big  # None: asyncio's default
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(make, *args))
    except BaseException:
        st.in_flight -= count
        raise


def _ids_only(body: CompletionRequest, prompts: list[Prompt], request: Request) -> bool:
    """Whether a completions request's engine requests are made on the event loop: a small body
    whose prompts are all token ids (nothing to tokenize) and no constraint (nothing to parse).
    Making them is then a type check, a range check and a copy per prompt (0.2-0.5 ms for 3,000
    ids on a CPU of CI), which holds the GIL in a worker thread as much as here; the thread's round
    trip only added the hand-offs (the thread waits for the GIL from the event loop, then wakes
    it again): 2 ms at the median, 6 ms at p90, with ten streams of 3,000-token prompts on a
    2-core CPU, time to first token that prefix caching cannot cut. Tokenizing (which releases
    the GIL) and a constraint's parsing stay in the thread, and so does a request whose ids
    times n exceed INLINE_IDS: the work grows with both, and on the event loop it would stall
    every other stream (64 KB of ids at n=128 took 138 ms)."""
    size = request.headers.get("content-length", "")
    return (size.isdigit() and int(size) <= BIG_BODY_BYTES and not any(isinstance(p, str) for p in prompts)
            and sum(map(len, prompts)) * body.n <= INLINE_IDS
            and all(getattr(body, f, None) is None for f in structured.CONSTRAINT_FIELDS))


def _completion_requests(st: _State, body: CompletionRequest, prompts: list[Prompt]) -> list[EngineRequest]:
    """Each prompt tokenized once and made into its n engine requests (a worker thread; token ids
    alone: the event loop, `_ids_only`)."""
    jobs = []
    constraint = structured.requested_constraint(body, reasoning=False)  # a raw prompt: constrained from its start
    for p in prompts:
        ids = (st.engine.tokenizer.encode(p) if p else []) if isinstance(p, str) else p
        max_tokens = _max_tokens(st, 1 if body.scores_only else body.max_tokens, len(ids))
        prompt_logprobs = body.logprobs if body.echo else None  # echo: the prompt's tokens' logprobs too
        jobs += [st.engine.make_request(ids, structured.constrained(
                     body.sampling(max_tokens, body.logprobs, j, st.defaults, prompt_logprobs), constraint))
                 for j in range(body.n)]
    return jobs


def _chat_requests(st: _State, body: ChatRequest, tools: structured.ChatTools) -> tuple[list[EngineRequest], bool]:
    """The messages rendered (with the tools), tokenized once and made into n engine requests,
    their constraint compiled (a worker thread); and whether the template opened a think block
    (the output then starts inside it)."""
    kwargs = {**(body.chat_template_kwargs or {}), **({"tools": tools.tools} if tools.tools else {})}
    text = st.engine.apply_chat_template(body.template_messages(), add_generation_prompt=body.add_generation_prompt,
                                         **kwargs)
    st.limits.check_text(text)
    ids = st.engine.tokenizer.encode(text)
    max_tokens = _max_tokens(st, body.max_new_tokens, len(ids))
    constraint = structured.chat_constraint(body, tools, may_think(text))
    return [st.engine.make_request(ids, structured.constrained(body.sampling(max_tokens, body.logprobs_asked, j,
                                                                             st.defaults), constraint))
            for j in range(body.n)], opens_reasoning(text)


def _max_tokens(st: _State, asked: int | None, prompt_tokens: int) -> int:
    """What was asked, else the rest of the context (vLLM's default); at most the checkpoint's
    max_new_tokens when its generation_config is in force (vLLM's cap). A prompt that leaves no
    room is refused here, before its ids are copied into requests."""
    if prompt_tokens >= st.engine.max_model_len:
        raise prompt_fills_context(prompt_tokens, st.engine.max_model_len)
    cap = st.defaults.get("max_tokens")
    wanted = st.engine.max_model_len - prompt_tokens if asked is None else asked
    return wanted if cap is None or not isinstance(wanted, int) else min(wanted, cap)


def _start(st: _State, jobs: list[EngineRequest], request: Request) -> Generation:
    """The Generation of requests whose places _prepare took."""
    return Generation(st.engine, jobs, st.metrics, request.receive, on_done=lambda: _one_done(st))


def _one_done(st: _State) -> None:
    st.in_flight -= 1


def _usage(done: list[Completion], n: int) -> dict:
    """A prompt counts once however many choices it has (OpenAI's n), and so do its cached tokens
    (its first choice's: the others take the blocks it computed)."""
    return protocol.usage(sum(c.prompt_tokens for c in done[::n]), sum(c.output_tokens for c in done),
                          sum(c.cached_tokens for c in done[::n]))


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
                yield protocol.sse_event(chunk)
        except ClientGone:
            outcome = "client gone"
            return
        except (asyncio.CancelledError, GeneratorExit):  # Starlette saw the disconnect, or shutdown's grace ran out
            outcome = "cancelled"
            raise
        except Exception as e:  # the headers went out: the error goes in the stream, as vLLM does
            outcome = 500
            log.exception("%s: the engine failed mid-stream", meta.id)
            yield protocol.sse_event(protocol.error_body(str(e), 500))
        finally:
            gen.cancel()  # no await here: Starlette may be cancelling this generator
            _log_request(st, request, meta.id, outcome, gen)
        yield DONE

    return StreamingResponse(body(), media_type="text/event-stream")


async def _stream_completion(st: _State, gen: Generation, meta: Meta, body: CompletionRequest) -> AsyncIterator[dict]:
    pending = _Pending(body.n * len(body.prompts()))
    offsets = [0] * len(pending.ids)  # where each choice's text so far ends, for text_offset
    async for e in gen.events():
        pending.add(e)
        if not (e.text or e.completion):
            continue
        logprobs = None
        if e.logprobs is not None:
            logprobs = st.text.completion_logprobs(*pending.pop(e.index), offset=offsets[e.index])
            offsets[e.index] += sum(map(len, logprobs["tokens"]))
        yield meta.body([{"index": e.index, "text": e.text, "logprobs": logprobs, "finish_reason": _finish(e)}],
                        **_chunk_usage(body, gen, e.index, pending.sent[e.index]))
    if body.include_usage:
        yield meta.body([], usage=_usage(gen.completions, body.n))


class _Pending:
    """Each choice's tokens, logprobs and top alternatives not yet sent (a piece of text can lag
    its tokens)."""

    def __init__(self, choices: int) -> None:
        self.sent = [0] * choices  # each choice's tokens so far, sent or about to be
        self.ids: list[list[int]] = [[] for _ in range(choices)]
        self.logprobs: list[list[float]] = [[] for _ in range(choices)]
        self.top: list[list[dict[int, float]] | None] = [[] for _ in range(choices)]

    def add(self, e: Event) -> None:
        self.sent[e.index] += len(e.token_ids)
        self.ids[e.index] += e.token_ids
        self.logprobs[e.index] += e.logprobs or []
        if e.top_logprobs is None:
            self.top[e.index] = None
        elif self.top[e.index] is not None:
            self.top[e.index] += e.top_logprobs

    def pop(self, index: int) -> tuple[list[int], list[float], list[dict[int, float]] | None]:
        out = self.ids[index], self.logprobs[index], self.top[index]
        self.ids[index], self.logprobs[index] = [], []
        self.top[index] = None if out[2] is None else []
        return out


async def _stream_chat(st: _State, gen: Generation, meta: Meta, body: ChatRequest,
                       thinking: bool, parse_tools: bool) -> AsyncIterator[dict]:
    for i in range(body.n):
        yield meta.body([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}], **_chunk_usage(body, gen, i, 0))
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
        logprobs = st.text.chat_logprobs(*pending.pop(e.index), body.top_logprobs or 0) \
            if e.logprobs is not None else None
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
                              "finish_reason": finish if last else None}],
                            **_chunk_usage(body, gen, e.index, pending.sent[e.index]))
    if body.include_usage:
        yield meta.body([], usage=_usage(gen.completions, body.n))


def _chunk_usage(body: CompletionRequest | ChatRequest, gen: Generation, index: int, tokens: int) -> dict:
    """What a chunk carries besides its choice: with include_usage, "usage": null (OpenAI's: the
    last chunk has it); with continuous_usage_stats too, its choice's prompt and completion
    tokens so far (vLLM's, which load generators such as guidellm ask for)."""
    if body.continuous_usage:
        return {"usage": protocol.usage(gen.prompt_tokens[index], tokens, cached_tokens=None)}
    return {"usage": None} if body.include_usage else {}


def _finish(e: Event) -> str | None:
    return None if e.completion is None else e.completion.finish_reason


def _log_request(st: _State, request: Request, rid: str, outcome: int | str, gen: Generation | None = None,
                 detail: str = "") -> None:
    st.metrics.requests.labels(request.url.path, str(outcome)).inc()
    if gen is None:
        log.info("%s %s %s: %s", request.method, request.url.path, outcome, detail)
        return
    ttft = "-" if gen.first_token_s is None else f"{gen.first_token_s:.3f}s"
    done = [c for c in gen.completions if c is not None]
    # what each engine request did, finished or cut short (a cancelled one has no Completion)
    log.info("%s %s %s %s: %d requests, tokens in %d (cached %d) out %d, first token %s, total %.3fs", rid,
             request.method, request.url.path, outcome, len(gen.completions), sum(gen.prompt_tokens),
             sum(c.cached_tokens for c in done), sum(gen.output_tokens), ttft,
             time.perf_counter() - gen.arrival)


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
        if any(err.get("type") == "json_invalid" for err in errors):
            bad = next(err for err in errors if err.get("type") == "json_invalid")
            detail = (bad.get("ctx") or {}).get("error", "")
            return reply(request, 400, f"the request body is not valid JSON ({detail or bad['msg']}); send a JSON "
                                       "object with Content-Type: application/json.")
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
