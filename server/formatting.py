"""Engine events as OpenAI JSON: one request's chunks, final chunk, usage chunk and full response.

Completions and chat differ only in where a choice's text goes (``text`` or
``delta.content``/``message.content``) and in their logprobs shape; everything
else is :class:`OpenAIFormat`, shared. Streamed token chunks go through a
:class:`ChunkTemplate` serialised once per request.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from typing import ClassVar

from pydantic import BaseModel

from engine.requests import FinishEvent, TokenEvent
from engine.text.tokenizer import Tokenizer
from engine.thinking import ThoughtEvent
from server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    PromptTokensDetails,
    ThinkThought,
    ThinkUsage,
    Usage,
)

SSE_DONE = b"data: [DONE]\n\n"
_TEXT_MARK = "\x00crsm-text\x00"
_LOGPROBS_MARK = "\x00crsm-logprobs\x00"
_USAGE_MARK = "\x00crsm-usage\x00"


def request_id(prefix: str) -> str:
    """``prefix`` + a random UUID4's hex, drawn from Python's generator rather than ``os.urandom``.

    The id only has to be unique. ``os.urandom`` is a system call that releases the GIL, and the event loop that
    drops the GIL while the engine thread is running (a prefill, a decode step) waits for it again, milliseconds
    under cProfile in the middle of starting a stream (and every stream on the loop waits with it)."""
    return prefix + uuid.UUID(int=random.getrandbits(128), version=4).hex


def sse(payload: dict, event: str | None = None) -> bytes:
    """One SSE frame of a JSON payload (compact, as every frame the server writes)."""
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    return b"event: " + event.encode() + b"\n" + data if event else data


def sse_model(model: BaseModel, event: str | None = None) -> bytes:
    return sse(model.model_dump(mode="json"), event)


class ChunkTemplate:
    """A chunk serialised once with markers where the text, the logprobs and the usage go; a token only
    JSON-escapes its text (and formats its usage numbers when they are asked for).

    ``text_path`` leads to the choice's text in the chunk's JSON; the choice's ``logprobs`` sits beside the
    first key of that path (``choices[0].logprobs``) and comes after the text on the wire; ``usage`` (with
    ``with_usage``: ``stream_options.continuous_usage_stats``) is the chunk's last key.
    """

    def __init__(self, chunk: BaseModel, text_path: tuple, with_usage: bool = False):
        data = chunk.model_dump(mode="json")
        node = data
        for key in text_path[:-1]:
            node = node[key]
        node[text_path[-1]] = _TEXT_MARK
        data[text_path[0]][text_path[1]]["logprobs"] = _LOGPROBS_MARK
        if with_usage:
            assert "usage" not in data, "usage is the last key of a chunk, added here"
            data["usage"] = _USAGE_MARK
        head, _, rest = sse(data).partition(json.dumps(_TEXT_MARK).encode())
        mid, _, tail = rest.partition(json.dumps(_LOGPROBS_MARK).encode())
        assert tail, "the text comes before the logprobs in a chunk"
        tail, _, end = tail.partition(json.dumps(_USAGE_MARK).encode())
        assert bool(end) == with_usage, "the usage comes after the logprobs"
        self._head, self._mid, self._tail, self._end = head, mid, tail, end
        self._no_logprobs = mid + b"null" + tail

    def render(self, text: str, logprobs: dict | None = None, usage: bytes = b"") -> bytes:
        """One chunk; ``usage``: :func:`usage_json`, when the template was made ``with_usage``."""
        if logprobs is None:
            return self._head + json.dumps(text).encode() + self._no_logprobs + usage + self._end
        lp = json.dumps(logprobs, separators=(",", ":")).encode()
        return self._head + json.dumps(text).encode() + self._mid + lp + self._tail + usage + self._end


def usage_json(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> bytes:
    """A :class:`server.responses.Usage` without ``think`` as compact JSON, formatted without pydantic (one per
    streamed token with ``continuous_usage_stats``)."""
    return b'{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,"prompt_tokens_details":' \
           b'{"cached_tokens":%d}}' % (prompt_tokens, completion_tokens, prompt_tokens + completion_tokens,
                                        cached_tokens)


def finish_reason(event: FinishEvent) -> str:
    return {"cancelled": "abort"}.get(event.reason, event.reason)


def usage_of(event: FinishEvent) -> Usage:
    u = event.usage
    return Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
                 think=ThinkUsage.model_validate(u.think.as_dict()) if u.think is not None else None)


def thought_of(event: ThoughtEvent, rid: str, tokenizer: Tokenizer) -> ThinkThought:
    return ThinkThought(id=rid, planned_at=event.planned_at, applied_at=event.applied_at, outcome=event.outcome,
                        confidence=round(event.confidence, 6), a_eff=round(event.a_eff, 6),
                        delta_norm=round(event.delta_norm, 6), path=tokenizer.decode(event.path),
                        path_token_ids=event.path, simulations=event.simulations,
                        chosen=None if event.chosen is None else tokenizer.decode([event.chosen]),
                        chosen_token_id=event.chosen)


class OpenAIFormat:
    """One request's OpenAI objects. Subclasses say where the text goes and what the logprobs look like."""

    prefix: ClassVar[str]
    chunk_model: ClassVar[type[BaseModel]]
    text_path: ClassVar[tuple]  # where a streamed chunk's text sits in its JSON

    def __init__(self, model: str, tokenizer: Tokenizer, tokens_as_ids: bool, session_id: str | None):
        self.id, self.created = request_id(self.prefix), int(time.time())
        self.model, self.tokenizer, self.tokens_as_ids, self.session_id = model, tokenizer, tokens_as_ids, session_id

    # What differs ---------------------------------------------------------------
    def choice(self, text: str | None, logprobs: dict | None, reason: str | None) -> BaseModel:
        raise NotImplementedError

    def logprobs(self, events: list[TokenEvent], offset: int) -> dict:
        raise NotImplementedError

    def response(self, events: list[TokenEvent], final: FinishEvent, with_logprobs: bool) -> BaseModel:
        raise NotImplementedError

    def head(self, usage: Usage | None = None) -> bytes:
        """Frames before the first token (``usage``: with ``continuous_usage_stats``)."""
        return b""

    # Shared ---------------------------------------------------------------------
    def chunk(self, choices: list, usage: Usage | None = None) -> BaseModel:
        return self.chunk_model(id=self.id, created=self.created, model=self.model, choices=choices,
                                session_id=self.session_id, usage=usage)

    def template(self, with_usage: bool = False) -> ChunkTemplate:
        return ChunkTemplate(self.chunk([self.choice("", None, None)]), self.text_path, with_usage)

    def final_chunk(self, event: FinishEvent, with_usage: bool = False) -> BaseModel:
        return self.chunk([self.choice(event.text or None, None, finish_reason(event))],
                          usage_of(event) if with_usage else None)

    def usage_chunk(self, event: FinishEvent) -> BaseModel:
        return self.chunk([], usage_of(event))

    def token(self, tid: int) -> str:
        return f"token_id:{tid}" if self.tokens_as_ids else self.tokenizer.token_repr(tid)


class CompletionFormat(OpenAIFormat):
    prefix, chunk_model, text_path = "cmpl-", Completion, ("choices", 0, "text")

    def choice(self, text: str | None, logprobs: dict | None, reason: str | None) -> CompletionChoice:
        return CompletionChoice(text=text or "", finish_reason=reason,
                                logprobs=None if logprobs is None else CompletionLogprobs.model_validate(logprobs))

    def logprobs(self, events: list[TokenEvent], offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset
        for ev in events:
            tokens.append(self.token(ev.token_id))
            lps.append(ev.logprob)
            tops.append({self.token(t): lp for t, lp in ev.top_logprobs} if ev.top_logprobs else None)
            offsets.append(pos)
            pos += len(ev.text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def response(self, events: list[TokenEvent], final: FinishEvent, with_logprobs: bool) -> Completion:
        text = "".join(e.text for e in events) + final.text
        choice = self.choice(text, self.logprobs(events, 0) if with_logprobs else None, finish_reason(final))
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage_of(final),
                          session_id=self.session_id)


class ChatFormat(OpenAIFormat):
    prefix, chunk_model, text_path = "chatcmpl-", ChatCompletionChunk, ("choices", 0, "delta", "content")

    def choice(self, text: str | None, logprobs: dict | None, reason: str | None) -> ChatChunkChoice:
        return ChatChunkChoice(delta=ChatDelta(content=text), finish_reason=reason,
                               logprobs=None if logprobs is None else ChatLogprobs.model_validate(logprobs))

    def head(self, usage: Usage | None = None) -> bytes:
        first = ChatChunkChoice(delta=ChatDelta(role="assistant", content=""), logprobs=None, finish_reason=None)
        return sse_model(self.chunk([first], usage))

    def logprobs(self, events: list[TokenEvent], offset: int) -> dict:
        def entry(tid: int, lp: float) -> dict:
            data = self.tokenizer.token_bytes(tid)
            return {"token": self.token(tid), "logprob": lp, "bytes": list(data) if data else None}

        return {"content": [{**entry(ev.token_id, ev.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in (ev.top_logprobs or [])]} for ev in events]}

    def response(self, events: list[TokenEvent], final: FinishEvent, with_logprobs: bool) -> ChatCompletion:
        message = ChatResponseMessage(content="".join(e.text for e in events) + final.text)
        choice = ChatChoice(message=message, finish_reason=finish_reason(final),
                            logprobs=ChatLogprobs.model_validate(self.logprobs(events, 0)) if with_logprobs else None)
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=[choice],
                              usage=usage_of(final), session_id=self.session_id)
