"""Response bodies and stream payloads (pydantic): what the routes return, as ``/openapi.json`` documents it.

Field order is wire order. Optional extensions that are absent on the wire when
unset (``session_id``, ``usage`` on chunks, ``usage.think``, a chat delta's
keys) are excluded when None; every other None (``logprobs``,
``finish_reason``, ``param``, ``bytes``...) is sent as ``null``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def _absent_if_none(value: object) -> bool:
    return value is None


def _optional(description: str):
    """A field left out of the JSON (not sent as null) when it is None."""
    return Field(None, exclude_if=_absent_if_none, description=description)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Errors ---------------------------------------------------------------------------
class ErrorDetail(_Body):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(_Body):
    """Every error, as a JSON response and as a mid-stream SSE event: ``{"error": {...}}``."""

    error: ErrorDetail


# Usage ----------------------------------------------------------------------------
class PromptTokensDetails(_Body):
    cached_tokens: int = Field(description="prompt tokens served from a cached state (session or prefix cache)")


class ThinkUsage(_Body):
    """Extension: what the planner did for this request (plans and the fate of each delta)."""

    plans: int
    simulations: int
    applied: int
    gated: int
    stale: int
    diverged: int
    rejected: int
    dropped: int
    verifier: str | None = _optional("the request's verifier (think.verifier), when it named one")
    verified: bool | None = _optional("that verifier's verdict on the final answer (the text without the stop "
                                      "string), checked by the server at finish")


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    think: ThinkUsage | None = _optional("extension: present when the request thought")


# Logprobs -------------------------------------------------------------------------
class CompletionLogprobs(_Body):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatTopLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(_Body):
    content: list[ChatTokenLogprob]


# Completions ------------------------------------------------------------------------
class CompletionChoice(_Body):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(_Body):
    """``/v1/completions``: the response, and (``stream``) each SSE chunk; the same object either way."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    session_id: str | None = _optional("extension: the session this request continued")
    usage: Usage | None = _optional("always on a response; in a stream, on the last chunk with include_usage, and "
                                    "on every chunk (completion tokens so far) with continuous_usage_stats")


# Chat ---------------------------------------------------------------------------------
class ChatDelta(_Body):
    role: Literal["assistant"] | None = _optional("on the first chunk")
    content: str | None = _optional("text released by this chunk")


class ChatChunkChoice(_Body):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Body):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    session_id: str | None = _optional("extension: the session this request continued")
    usage: Usage | None = _optional("on the last chunk of a stream with include_usage; on every chunk (completion "
                                    "tokens so far) with continuous_usage_stats")


class ChatResponseMessage(_Body):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Body):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(_Body):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    session_id: str | None = _optional("extension: the session this request continued")


# /think events ---------------------------------------------------------------------------
class ThinkToken(_Body):
    """SSE ``event: token``."""

    id: str
    index: int
    token_id: int
    text: str


class ThinkThought(_Body):
    """SSE ``event: thought``: one delta's fate (planned at, landed at, confidence, blend, the searched path)."""

    id: str
    planned_at: int
    applied_at: int | None
    outcome: str
    confidence: float
    a_eff: float
    delta_norm: float
    path: str
    path_token_ids: list[int]
    simulations: int
    chosen: str | None = _optional("the search's choice at the node the delta landed on (the token it makes win)")
    chosen_token_id: int | None = _optional("that token's id")


class ThinkDone(_Body):
    """SSE ``event: done``: the last event of a ``/think`` stream that did not fail."""

    id: str
    text: str
    finish_reason: str
    usage: Usage
    session_id: str | None = _optional("extension: the session this request continued")


# Sessions, models, probes --------------------------------------------------------------
class SessionInfo(_Body):
    id: str
    object: Literal["session"] = "session"
    created: int
    tokens: int = Field(description="tokens of history the cached state has read")
    state_bytes: int
    busy: bool
    metadata: dict[str, str]


class SessionDeleted(_Body):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool


class ModelCard(_Body):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int
    verified: bool = Field(description="extension: the checkpoint was verified against its manifest (sha256 of "
                                       "every file); false for a foreign mamba-ssm / Hugging Face folder")
    architecture: str = Field(description="extension: the mixer every layer runs, Mamba1 (Mamba-1 and Falcon-Mamba) "
                                          "or Mamba2")
    state_bytes_per_session: int = Field(description="extension: bytes of one session's recurrent state in memory "
                                                     "(conv windows and SSM states of every layer); a session costs "
                                                     "this whatever its history's length")


class ModelList(_Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Body):
    status: Literal["ok"] = "ok"


class Ready(_Body):
    status: Literal["ready"] = "ready"
    model: str


# What each stream's ``data:`` lines carry (documented under text/event-stream).
STREAM_MODELS = (Completion, ChatCompletionChunk, ThinkToken, ThinkThought, ThinkDone, ErrorBody)
