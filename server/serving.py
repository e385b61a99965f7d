"""The serving object: everything the routers share (engine, tokenizer, chat template, config, metrics, planner).

One instance lives in ``app.state.serving``; routers get it with the
:func:`serving` dependency. It checks what only the server knows (the model
name, readiness, which OpenAI fields are supported) and submits requests
(:meth:`Serving.start`; the engine validates what reaches the model, takes a
session's lease and gives it back when the request ends), and feeds the
request metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from engine.loop.scheduler import Engine
from engine.requests import (
    ContextLengthExceeded,
    EmptyPrompt,
    EngineDead,
    EngineOverloaded,
    FinishEvent,
    GenerationRequest,
    InvalidRequest,
    RequestHandle,
    TokenEvent,
)
from engine.sampling import SamplingParams
from engine.sessions import (
    SessionBusy,
    SessionNotFound,
    SessionStateInvalid,
    SessionStoreUnavailable,
    SessionTooLarge,
)
from engine.text.chat import ChatTemplate, ChatTemplateError
from engine.text.tokenizer import Tokenizer
from engine.thinking import ThinkParams, ThoughtEvent
from server.drain import RETRY_AFTER_SECONDS, Drain
from server.errors import APIError
from server.metrics import Metrics
from server.responses import ModelCard, ModelList
from server.schemas import ChatMessage, ThinkOptions

T = TypeVar("T")


@dataclass
class ServerConfig:
    model_name: str = "crsm-default"
    default_max_tokens: int = 256
    max_body_bytes: int = 8 << 20
    body_timeout: float = 30.0  # seconds a request body may take to arrive whole, from its headers (408 after)
    api_keys: frozenset[str] = field(default_factory=frozenset)
    metrics_api_key: str = ""  # when set, /metrics needs it as a bearer token
    retry_after_seconds: int = 1
    sse_ping_seconds: float = 15.0  # keep-alive comment on a quiet stream (proxies close idle connections)
    drain_timeout: float = 15.0  # SIGTERM: requests in flight may finish for this long, then end (server/drain.py)
    checkpoint_verified: bool = True  # False: a foreign folder loaded without a manifest (shown in /v1/models)
    architecture: str = "Mamba1"  # the model's mixer (MambaConfig.layer), shown in /v1/models
    state_bytes_per_session: int = 0  # one sequence's recurrent state in memory, shown in /v1/models


@dataclass(eq=False)  # compared and hashed by identity: the drain keeps a set of them
class Generation:
    """One accepted request on its way through the engine."""

    handle: RequestHandle
    session_id: str | None  # the session the request continues, if any
    logprobs: int | None  # None: not asked; else number of alternatives
    tokens_as_ids: bool  # logprob tokens read ``token_id:N`` (return_tokens_as_token_ids), not their text


async def serving(request: Request) -> Serving:
    """Dependency: the app's serving object (async: a plain ``def`` dependency would run on the thread pool)."""
    return request.app.state.serving


def session_or_404(action: Callable[[], T], session_id: str) -> T:
    """Run a session-store call; its refusals become 404, 409 (busy; stored state refused), 413 or 503 errors."""
    try:
        return action()
    except SessionNotFound:
        raise APIError(404, f"session '{session_id}' not found", param="session_id", code="session_not_found") from None
    except SessionBusy:
        raise APIError(409, f"session '{session_id}' is busy with another request", param="session_id",
                       code="session_busy") from None
    except SessionTooLarge as exc:
        raise APIError(413, str(exc), param="session_id") from None
    except SessionStateInvalid as exc:  # corrupt, foreign model or format: refused, never loaded
        raise APIError(409, f"session '{session_id}' cannot be used: {exc}", param="session_id",
                       code="session_state_invalid") from None
    except SessionStoreUnavailable as exc:
        raise APIError(503, str(exc), code="session_store_unavailable", headers={"Retry-After": "1"}) from None


class Serving:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, chat_template: ChatTemplate, config: ServerConfig,
                 metrics: Metrics | None = None, planner=None):
        self.engine, self.tokenizer, self.chat_template, self.config = engine, tokenizer, chat_template, config
        self.metrics = metrics or Metrics(config.model_name)
        self.planner = planner
        self.drain = Drain(engine, on_change=self.metrics.draining.set)
        self.metrics.bind_store(self._store_figures)

    def _store_figures(self) -> dict[str, int]:
        """What /metrics reports of the stores; without the session figures while the session store is unreachable
        (a Redis that is down must not take the whole scrape with it)."""
        engine = self.engine
        figures = {"prefix_queries": engine.prefix_cache.queries, "prefix_hits": engine.prefix_cache.hits}
        try:
            figures.update(sessions=len(engine.sessions), session_bytes=engine.sessions.nbytes,
                           session_evictions=engine.sessions.evictions)
        except SessionStoreUnavailable:
            pass
        return figures

    # Lifecycle -----------------------------------------------------------------------
    async def startup(self) -> None:
        if self.planner is not None:
            await self.planner.start()
        if not self.engine.alive:
            self.engine.start()

    async def shutdown(self) -> None:
        """The lifespan's end: requests still in flight (a shutdown that did not drain first) end with their final
        event, then the engine and the planner stop."""
        if self.drain.in_flight:
            await self.drain.run(timeout=0.0)
        self.engine.shutdown()
        self.engine.sessions.close()  # after the engine: its last requests have written back
        if self.planner is not None:
            await self.planner.stop()

    # Info ------------------------------------------------------------------------------
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.config.model_name, created=int(time.time()), owned_by="crsm",
                                         max_model_len=self.engine.max_context,
                                         verified=self.config.checkpoint_verified,
                                         architecture=self.config.architecture,
                                         state_bytes_per_session=self.config.state_bytes_per_session)])

    # Inputs ----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt)

    def render_chat(self, messages: list[ChatMessage]):
        try:
            return self.chat_template.render([{"role": m.role, "content": m.text()} for m in messages],
                                             add_generation_prompt=True)
        except ChatTemplateError as exc:
            raise APIError(400, f"chat template: {exc}", param="messages") from None

    def _check(self, body) -> None:
        name = self.config.model_name
        if body.model is not None and body.model != name:
            raise APIError(404, f"model '{body.model}' does not exist; this server serves '{name}'",
                           param="model", code="model_not_found")
        if self.drain.draining:  # nothing was read or held: safe for a client or a proxy to send it elsewhere
            raise APIError(503, "server is shutting down; retry on another replica or once it has restarted",
                           code="draining", headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"})
        if not self.engine.ready.is_set():
            raise APIError(503, "model is loading or warming up", headers={"Retry-After": "5"})

    def _sampling(self, body, logprobs: int | None) -> SamplingParams:
        return SamplingParams(temperature=body.temperature, top_k=max(0, body.top_k), top_p=body.top_p,
                              repetition_penalty=body.repetition_penalty, seed=body.seed, logprobs=logprobs)

    def _think(self, options: ThinkOptions | None) -> ThinkParams | None:
        if options is None:
            return None
        if self.engine.planner is None:
            raise APIError(400, "this server runs without a planner (--planner-workers 0); drop 'think'",
                           param="think", code="planner_disabled")
        return ThinkParams(**options.model_dump())

    # Submission: the engine validates, leases the session and gives it back when the request ends ----------
    def start(self, body, prompt_ids: list[int], owner: str | None, *, max_tokens: int | None, logprobs: int | None,
              stop_token_ids=(), boundaries=(), think: ThinkOptions | None = None) -> Generation:
        """Submit a generation; the engine's refusals become OpenAI errors (nothing is held after one)."""
        self._check(body)
        request = GenerationRequest(
            prompt_ids=prompt_ids, params=self._sampling(body, logprobs),
            max_tokens=max_tokens or min(self.config.default_max_tokens, self.engine.max_context), stop=body.stop,
            stop_token_ids=list(stop_token_ids), ignore_eos=body.ignore_eos, session_id=body.session_id, owner=owner,
            prefix_boundaries=list(boundaries) if body.session_id is None else [],
            think=self._think(think if think is not None else body.think),
        )
        try:
            handle = session_or_404(lambda: self.engine.submit(request), body.session_id)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param=exc.param, code="invalid_value") from None
        except EmptyPrompt:
            raise APIError(400, "the prompt is empty", param="prompt") from None
        except ContextLengthExceeded as exc:
            raise APIError(400, str(exc), param="prompt", code="context_length_exceeded") from None
        except EngineOverloaded:
            raise APIError(429, "server is at capacity; retry later", code="overloaded",
                           headers={"Retry-After": str(self.config.retry_after_seconds)}) from None
        except EngineDead:
            raise APIError(503, "engine is not running") from None
        gen = Generation(handle, body.session_id, logprobs, body.return_tokens_as_token_ids)
        self.drain.track(gen)  # the response writer calls drain.done(gen) once its final event is out
        return gen

    # Metrics -------------------------------------------------------------------------------
    def observe(self, gen: Generation, event: TokenEvent | ThoughtEvent | FinishEvent, last: list[float],
                now: float | None = None) -> None:
        """Request metrics of one event, timed at ``now``: when its frame is written (default: this call).

        TTFT and ITL are what a client sees, so they are taken where the server sends a token, not when the engine
        sampled it (a token may wait in the engine's outbox and the event loop). ``last[0]`` carries the send time
        of the request's previous token.
        """
        now = time.monotonic() if now is None else now
        if isinstance(event, TokenEvent):
            if last[0] == 0.0:
                self.metrics.ttft.observe(now - gen.handle.submitted)
            else:
                self.metrics.itl.observe(now - last[0])
            last[0] = now
            self.metrics.generation_tokens.inc()
        elif isinstance(event, FinishEvent):
            self.metrics.e2e.observe(now - gen.handle.submitted)
            self.metrics.prompt_tokens.inc(event.usage.prompt_tokens)
            self.metrics.cached_tokens.inc(event.usage.cached_tokens)

ServingDep = Annotated[Serving, Depends(serving)]  # a route parameter typed this way receives the serving object
