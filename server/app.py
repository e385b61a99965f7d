"""FastAPI application: OpenAI-compatible completions and chat, sessions, health, metrics.

The HTTP layer validates, tokenizes, submits to the engine (which leases sessions) and turns engine events
into OpenAI JSON / SSE. It never touches tensors: everything model-side goes
through :class:`engine.scheduler.Engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.chat import ChatTemplate, ChatTemplateError
from engine.requests import (
    ContextLengthExceeded,
    EmptyPrompt,
    EngineDead,
    EngineOverloaded,
    FinishEvent,
    GenerationRequest,
    InvalidRequest,
    TokenEvent,
)
from engine.sampling import SamplingParams
from engine.scheduler import Engine
from engine.sessions import SessionBusy, SessionNotFound, SessionTooLarge
from engine.thinking import ThinkParams, ThoughtEvent
from engine.tokenizer import Tokenizer
from server.errors import APIError, error_body, install_error_handlers
from server.metrics import Metrics
from server.schemas import ChatCompletionRequest, CompletionRequest, SessionCreateRequest, ThinkOptions, ThinkRequest


@dataclass
class ServerConfig:
    model_name: str = "crsm-default"
    default_max_tokens: int = 256
    max_body_bytes: int = 8 << 20
    api_keys: frozenset[str] = field(default_factory=frozenset)
    retry_after_seconds: int = 1


@dataclass
class Generation:
    """One accepted request on its way through the engine."""

    handle: object
    session_id: str | None  # the session the request continues, if any
    logprobs: int | None  # None: not asked; else number of alternatives
    token_ids_as_text: bool


def create_app(engine: Engine, tokenizer: Tokenizer, chat_template: ChatTemplate, config: ServerConfig,
               metrics: Metrics | None = None, planner=None) -> FastAPI:
    """``planner``: a started-with-the-app pool (``planner.pool.PlannerPool``) the engine posts jobs to, or None."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if planner is not None:
            await planner.start()
        if not engine.alive:
            engine.start()
        try:
            yield
        finally:
            engine.shutdown()
            if planner is not None:
                await planner.stop()

    app = FastAPI(title="CRSM serve", version="0.1.0", lifespan=lifespan)
    metrics = metrics or Metrics(config.model_name)
    metrics.bind_store(lambda: {
        "sessions": len(engine.sessions), "session_bytes": engine.sessions.nbytes,
        "prefix_queries": engine.prefix_cache.queries, "prefix_hits": engine.prefix_cache.hits,
    })
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    install_error_handlers(app)

    app.add_middleware(_LimitsAndErrorCounts, metrics=metrics, max_body_bytes=config.max_body_bytes)

    # Auth -------------------------------------------------------------------
    def owner_of(request: Request) -> str | None:
        """The caller's identity for session ownership; 401 without a valid key when keys are set."""
        if not config.api_keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in config.api_keys:
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")
        return hashlib.sha256(key.strip().encode()).hexdigest()[:16]

    # Health and info ----------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.alive:
            return JSONResponse(error_body(503, "engine thread is not running"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        if not (engine.alive and engine.ready.is_set()):
            return JSONResponse(error_body(503, "model is loading or warming up"), status_code=503)
        return JSONResponse({"status": "ready", "model": config.model_name})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(owner: str | None = Depends(owner_of)) -> dict:
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": int(time.time()), "owned_by": "crsm",
            "max_model_len": engine.max_context,
        }]}

    # Sessions -------------------------------------------------------------------
    @app.post("/v1/sessions")
    async def create_session(body: SessionCreateRequest | None = None, owner: str | None = Depends(owner_of)) -> dict:
        return engine.sessions.create(owner, metadata=(body.metadata if body else {})).describe()

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, owner: str | None = Depends(owner_of)) -> dict:
        return _session_or_404(lambda: engine.sessions.get(session_id, owner), session_id).describe()

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, owner: str | None = Depends(owner_of)) -> dict:
        _session_or_404(lambda: engine.sessions.delete(session_id, owner), session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.post("/v1/sessions/{session_id}/fork")
    async def fork_session(session_id: str, owner: str | None = Depends(owner_of)) -> dict:
        return _session_or_404(lambda: engine.sessions.fork(session_id, owner), session_id).describe()

    # Generation -------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != config.model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{config.model_name}'",
                           param="model", code="model_not_found")

    def sampling_of(body, logprobs: int | None) -> SamplingParams:
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; use repetition_penalty",
                           param="presence_penalty" if body.presence_penalty else "frequency_penalty")
        return SamplingParams(temperature=body.temperature, top_k=max(0, body.top_k), top_p=body.top_p,
                              repetition_penalty=body.repetition_penalty, seed=body.seed, logprobs=logprobs)

    def think_params(options: ThinkOptions | None) -> ThinkParams | None:
        if options is None:
            return None
        if engine.planner is None:
            raise APIError(400, "this server runs without a planner (--planner-workers 0); drop 'think'",
                           param="think", code="planner_disabled")
        return ThinkParams(**options.model_dump())

    def start(body, prompt_ids: list[int], owner: str | None, *, max_tokens: int | None, logprobs: int | None,
              stop_token_ids=(), boundaries=(), think: ThinkOptions | None = None) -> Generation:
        check_model(body.model)
        if not engine.ready.is_set():
            raise APIError(503, "model is loading or warming up", headers={"Retry-After": "5"})
        bad = [t for t in prompt_ids if not 0 <= t < engine.vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {engine.vocab}): {bad[:5]}", param="prompt")
        params = sampling_of(body, logprobs)
        thinking = think_params(think if think is not None else body.think)
        request = GenerationRequest(
            prompt_ids=prompt_ids, params=params, max_tokens=max_tokens or config.default_max_tokens,
            stop=body.stop, stop_token_ids=list(stop_token_ids), ignore_eos=body.ignore_eos,
            session_id=body.session_id, owner=owner,
            prefix_boundaries=list(boundaries) if body.session_id is None else [],
            think=thinking,
        )
        try:
            handle = _session_or_404(lambda: engine.submit(request), body.session_id)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None
        except EmptyPrompt:
            raise APIError(400, "the prompt is empty", param="prompt") from None
        except ContextLengthExceeded as exc:
            raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        except EngineOverloaded:
            raise APIError(429, "server is at capacity; retry later", code="overloaded",
                           headers={"Retry-After": str(config.retry_after_seconds)}) from None
        except EngineDead:
            raise APIError(503, "engine is not running") from None
        return Generation(handle, body.session_id, logprobs, body.return_tokens_as_token_ids)

    def token_str(tid: int, as_ids: bool) -> str:
        return f"token_id:{tid}" if as_ids else tokenizer.token_repr(tid)

    def observe(gen: Generation, event: TokenEvent | ThoughtEvent | FinishEvent, last: list[float]) -> None:
        if isinstance(event, ThoughtEvent):
            return
        if isinstance(event, TokenEvent):
            if last[0] == 0.0:
                metrics.ttft.observe(event.time - gen.handle.submitted)
            else:
                metrics.itl.observe(event.time - last[0])
            last[0] = event.time
            metrics.generation_tokens.inc()
        else:
            metrics.e2e.observe(event.time - gen.handle.submitted)
            metrics.prompt_tokens.inc(event.usage.prompt_tokens)
            metrics.cached_tokens.inc(event.usage.cached_tokens)

    def usage_json(event: FinishEvent) -> dict:
        u = event.usage
        out = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
               "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}
        if u.think is not None:
            out["think"] = u.think.as_dict()
        return out

    def finish_reason(event: FinishEvent) -> str:
        return {"cancelled": "abort"}.get(event.reason, event.reason)

    # Completions --------------------------------------------------------------------
    def completion_logprobs(events: list[TokenEvent], as_ids: bool, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset
        for ev in events:
            tokens.append(token_str(ev.token_id, as_ids))
            lps.append(ev.logprob)
            tops.append({token_str(t, as_ids): lp for t, lp in ev.top_logprobs} if ev.top_logprobs else None)
            offsets.append(pos)
            pos += len(ev.text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request, owner: str | None = Depends(owner_of)):
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt_ids = list(body.prompt) if isinstance(body.prompt, list) else tokenizer.encode(body.prompt)
        gen = start(body, prompt_ids, owner, max_tokens=body.max_tokens, logprobs=body.logprobs)
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(text: str, logprobs: dict | None, reason: str | None) -> dict:
            out = {"id": rid, "object": "text_completion", "created": created, "model": config.model_name,
                   "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
            if gen.session_id is not None:
                out["session_id"] = gen.session_id
            return out

        if body.stream:
            offset = 0

            def with_logprobs(event: TokenEvent) -> bytes:
                nonlocal offset
                lp = completion_logprobs([event], gen.token_ids_as_text, offset)
                offset += len(event.text)
                return _sse(chunk(event.text, lp, None))

            return _event_stream(_sse_events(
                gen, body, observe, head=[],
                text_chunk=_ChunkTemplate(chunk("", None, None), ("choices", 0, "text")),
                logprob_chunk=with_logprobs if gen.logprobs is not None else None,
                finish_chunk=lambda event: chunk(event.text, None, finish_reason(event)),
                usage_chunk=lambda event: {**chunk("", None, None), "choices": [], "usage": usage_json(event)},
            ))

        events, final = await _collect(gen, observe, request)
        text = "".join(e.text for e in events) + final.text
        if final.reason == "error":
            raise APIError(500, final.error or "generation failed", code="engine_error")
        body_out = chunk(text, completion_logprobs(events, gen.token_ids_as_text, 0) if gen.logprobs is not None else None,
                         finish_reason(final))
        body_out["usage"] = usage_json(final)
        return body_out

    # Chat ------------------------------------------------------------------------------
    def chat_logprobs(events: list[TokenEvent], as_ids: bool) -> dict:
        def entry(tid: int, lp: float) -> dict:
            data = tokenizer.token_bytes(tid)
            return {"token": token_str(tid, as_ids), "logprob": lp, "bytes": list(data) if data else None}

        return {"content": [{**entry(ev.token_id, ev.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in (ev.top_logprobs or [])]} for ev in events]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request, owner: str | None = Depends(owner_of)):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            rendered = chat_template.render(messages, add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise APIError(400, f"chat template: {exc}", param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        gen = start(body, rendered.token_ids, owner, max_tokens=body.max_completion_tokens or body.max_tokens,
                    logprobs=logprobs, stop_token_ids=rendered.stop_token_ids, boundaries=rendered.boundaries)
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(delta: dict, logprobs: dict | None, reason: str | None) -> dict:
            out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": config.model_name,
                   "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
            if gen.session_id is not None:
                out["session_id"] = gen.session_id
            return out

        if body.stream:
            return _event_stream(_sse_events(
                gen, body, observe, head=[_sse(chunk({"role": "assistant", "content": ""}, None, None))],
                text_chunk=_ChunkTemplate(chunk({"content": ""}, None, None), ("choices", 0, "delta", "content")),
                logprob_chunk=(lambda event: _sse(chunk({"content": event.text},
                                                        chat_logprobs([event], gen.token_ids_as_text), None)))
                if gen.logprobs is not None else None,
                finish_chunk=lambda event: chunk({"content": event.text} if event.text else {}, None,
                                                 finish_reason(event)),
                usage_chunk=lambda event: {**chunk({}, None, None), "choices": [], "usage": usage_json(event)},
            ))

        events, final = await _collect(gen, observe, request)
        if final.reason == "error":
            raise APIError(500, final.error or "generation failed", code="engine_error")
        out = {"id": rid, "object": "chat.completion", "created": created, "model": config.model_name,
               "choices": [{"index": 0, "message": {"role": "assistant",
                                                    "content": "".join(e.text for e in events) + final.text},
                            "logprobs": chat_logprobs(events, gen.token_ids_as_text) if gen.logprobs is not None else None,
                            "finish_reason": finish_reason(final)}],
               "usage": usage_json(final)}
        if gen.session_id is not None:
            out["session_id"] = gen.session_id
        return out

    # Thinking ---------------------------------------------------------------------------
    def thought_json(event: ThoughtEvent) -> dict:
        return {"planned_at": event.planned_at, "applied_at": event.applied_at, "outcome": event.outcome,
                "confidence": round(event.confidence, 6), "a_eff": round(event.a_eff, 6),
                "delta_norm": round(event.delta_norm, 6), "path": tokenizer.decode(event.path),
                "path_token_ids": event.path, "simulations": event.simulations}

    @app.post("/think")
    async def think(body: ThinkRequest, owner: str | None = Depends(owner_of)):
        """Generation with deliberation, streamed as SSE ``token``, ``thought`` and ``done`` events."""
        prompt_ids = list(body.prompt) if isinstance(body.prompt, list) else tokenizer.encode(body.prompt)
        gen = start(body, prompt_ids, owner, max_tokens=body.max_tokens, logprobs=None, think=body.think_options())
        rid = "think-" + uuid.uuid4().hex

        async def events() -> AsyncIterator[bytes]:
            last, index = [0.0], 0
            async for batch in _batches(gen):
                out: list[bytes] = []
                for event in batch:
                    observe(gen, event, last)
                    if isinstance(event, TokenEvent):
                        out.append(_sse({"id": rid, "index": index, "token_id": event.token_id, "text": event.text},
                                        "token"))
                        index += 1
                    elif isinstance(event, ThoughtEvent):
                        out.append(_sse({"id": rid, **thought_json(event)}, "thought"))
                    elif event.reason == "error":
                        out.append(_sse(error_body(500, event.error or "generation failed", code="engine_error"),
                                        "error"))
                    else:
                        done = {"id": rid, "text": event.text, "finish_reason": finish_reason(event),
                                "usage": usage_json(event)}
                        if gen.session_id is not None:
                            done["session_id"] = gen.session_id
                        out.append(_sse(done, "done"))
                if out:
                    yield b"".join(out)

        return _event_stream(events())

    return app


class _LimitsAndErrorCounts:
    """Pure ASGI middleware: 413 for oversized bodies, error responses counted by status.

    (Starlette's BaseHTTPMiddleware would wrap ``receive`` and hide client
    disconnects from the endpoints, which cancel generation on them.)
    """

    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            self.metrics.error(413)
            response = JSONResponse(error_body(413, f"request body over {self.max_body_bytes} bytes"), status_code=413)
            return await response(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.error(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def _session_or_404(action, session_id: str):
    try:
        return action()
    except SessionNotFound:
        raise APIError(404, f"session '{session_id}' not found", param="session_id", code="session_not_found") from None
    except SessionBusy:
        raise APIError(409, f"session '{session_id}' is busy with another request", param="session_id",
                       code="session_busy") from None
    except SessionTooLarge as exc:
        raise APIError(413, str(exc), param="session_id") from None


SSE_DONE = b"data: [DONE]\n\n"
DISCONNECT_POLL_SECONDS = 0.25
_TEXT_MARK = "\x00crsm-text\x00"


def _sse(payload: dict, event: str | None = None) -> bytes:
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    return b"event: " + event.encode() + b"\n" + data if event else data


class _ChunkTemplate:
    """A chunk serialised once with a marker where the text goes; each token only JSON-escapes its text."""

    def __init__(self, chunk: dict, path: tuple):
        node = chunk
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = _TEXT_MARK
        head, _, tail = _sse(chunk).partition(json.dumps(_TEXT_MARK).encode())
        self._head, self._tail = head, tail

    def render(self, text: str) -> bytes:
        return self._head + json.dumps(text).encode() + self._tail


def _event_stream(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse_events(gen: Generation, body, observe, *, head: list[bytes], text_chunk: _ChunkTemplate,
                      logprob_chunk: Callable[[TokenEvent], bytes] | None,
                      finish_chunk: Callable[[FinishEvent], dict],
                      usage_chunk: Callable[[FinishEvent], dict]) -> AsyncIterator[bytes]:
    """The SSE body of a streamed completion or chat completion: one write per batch of events."""
    for item in head:
        yield item
    last = [0.0]
    async for batch in _batches(gen):
        out: list[bytes] = []
        for event in batch:
            observe(gen, event, last)
            if isinstance(event, ThoughtEvent):
                continue  # OpenAI clients see thinking in metrics and the final usage only
            if isinstance(event, TokenEvent):
                if logprob_chunk is not None:
                    out.append(logprob_chunk(event))
                elif event.text:
                    out.append(text_chunk.render(event.text))
            else:
                out += _final_chunks(event, finish_chunk(event), body, lambda event=event: usage_chunk(event))
                out.append(SSE_DONE)
        if out:
            yield b"".join(out)


def _batches(gen: Generation) -> AsyncIterator[list[TokenEvent | ThoughtEvent | FinishEvent]]:
    """The request's events in batches of whatever has arrived; a consumer that goes away cancels it."""
    return gen.handle.batches()


async def _collect(gen: Generation, observe, request: Request) -> tuple[list[TokenEvent], FinishEvent]:
    """All events of a non-streamed request; a client that hangs up cancels the generation."""

    async def gather() -> tuple[list[TokenEvent], FinishEvent]:
        events: list[TokenEvent] = []
        last = [0.0]
        async for batch in _batches(gen):
            for event in batch:
                observe(gen, event, last)
                if isinstance(event, TokenEvent):
                    events.append(event)
                elif isinstance(event, FinishEvent):
                    return events, event
        raise asyncio.CancelledError

    task = asyncio.create_task(gather())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await request.is_disconnected():
                gen.handle.cancel()
    finally:
        if not task.done():
            task.cancel()


def _final_chunks(event: FinishEvent, last_chunk: dict, body, usage_chunk) -> list[bytes]:
    """The finish chunk (or an error event), then the usage chunk when asked for."""
    if event.reason == "error":
        items = [_sse(error_body(500, event.error or "generation failed", code="engine_error"))]
    else:
        items = [_sse(last_chunk)]
    if body.stream_options is not None and body.stream_options.include_usage:
        items.append(_sse(usage_chunk()))
    return items
