"""``POST /think``: generation with deliberation, streamed as SSE ``token``, ``thought`` and ``done`` events."""

from __future__ import annotations

from sse_starlette import EventSourceResponse

from server.auth import Owner
from server.errors import error_responses
from server.formatting import request_id
from server.responses import ErrorBody, ThinkDone, ThinkThought, ThinkToken
from server.routes.router import Router
from server.schemas import ThinkRequest
from server.serving import ServingDep
from server.streaming import event_stream, sse_doc, think_events

router = Router(tags=["think"])


@router.post("/think", response_class=EventSourceResponse,
             responses={200: sse_doc(ThinkToken, ThinkThought, ThinkDone, ErrorBody),
                        **error_responses(400, 401, 404, 409, 413, 429, 503)})
async def think(body: ThinkRequest, owner: Owner, srv: ServingDep):
    """Generation with deliberation: ``event: token`` per token, ``event: thought`` per plan, then one ``event:
    done`` (or ``event: error``)."""
    gen = srv.start(body, srv.encode(body.prompt), owner, max_tokens=body.max_tokens, logprobs=None,
                    think=body.think_options())
    return event_stream(srv, gen, think_events(srv, gen, request_id("think-")))
