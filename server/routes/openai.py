"""``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI shapes, JSON or SSE."""

from __future__ import annotations

from fastapi import Request

from server.auth import Owner
from server.errors import APIError, error_responses
from server.formatting import ChatFormat, CompletionFormat, OpenAIFormat
from server.responses import ChatCompletion, ChatCompletionChunk, Completion, ErrorBody
from server.routes.router import Router
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.serving import Generation, Serving, ServingDep
from server.streaming import collect, event_stream, openai_events, sse_doc

router = Router(tags=["openai"])
GENERATION_ERRORS = error_responses(400, 401, 404, 409, 413, 429, 500, 503)


async def _respond(srv: Serving, gen: Generation, body, fmt: OpenAIFormat, request: Request):
    """SSE chunks when ``stream``, else the whole response once the request finishes."""
    if body.stream:
        options = body.stream_options
        include_usage = options is not None and options.include_usage
        continuous_usage = options is not None and options.continuous_usage_stats
        return event_stream(srv, gen, openai_events(srv, gen, fmt, include_usage, continuous_usage))
    events, final = await collect(srv, gen, request)
    if final.reason == "error":
        raise APIError(500, final.error or "generation failed", code="engine_error")
    return fmt.response(events, final, gen.logprobs is not None)


@router.post("/v1/completions", response_model=Completion,
             responses={200: sse_doc(Completion, ErrorBody, done=True), **GENERATION_ERRORS})
async def completions(body: CompletionRequest, request: Request, owner: Owner, srv: ServingDep):
    """A text completion; with ``stream`` an SSE stream of chunks ending ``data: [DONE]``."""
    gen = srv.start(body, srv.encode(body.prompt), owner, max_tokens=body.max_tokens, logprobs=body.logprobs)
    fmt = CompletionFormat(srv.config.model_name, srv.tokenizer, gen.tokens_as_ids, gen.session_id)
    return await _respond(srv, gen, body, fmt, request)


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={200: sse_doc(ChatCompletionChunk, ErrorBody, done=True), **GENERATION_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request, owner: Owner, srv: ServingDep):
    """A chat completion; with ``stream`` an SSE stream of chunks ending ``data: [DONE]``."""
    rendered = srv.render_chat(body.messages)
    gen = srv.start(body, rendered.token_ids, owner, max_tokens=body.max_completion_tokens or body.max_tokens,
                    logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                    stop_token_ids=rendered.stop_token_ids, boundaries=rendered.boundaries)
    fmt = ChatFormat(srv.config.model_name, srv.tokenizer, gen.tokens_as_ids, gen.session_id)
    return await _respond(srv, gen, body, fmt, request)

