"""One request in flight inside the engine: where it is, what it has consumed, what it has produced.

Token counts are kept as two numbers fixed at admission (``cached``: tokens
already in the start state; ``prompt_tokens``: those plus the tokens to
prefill, the prompt as OpenAI usage counts it) and two lists (``to_feed``,
``generated``); everything else is derived from them. The newest generated
token is always pending: it is fed into the state by the next decode step.
"""

from __future__ import annotations

import enum
import time

import torch

from engine.loop.deliberation import PlanState
from engine.requests import FinishEvent, RequestHandle, TokenEvent, Usage
from engine.sessions import Session
from engine.state import MambaState
from engine.text.stops import StopMatcher
from engine.text.tokenizer import IncrementalDecoder, Tokenizer


class Phase(enum.Enum):
    """Where a sequence sits; :meth:`engine.loop.scheduler.Engine._in_flight` knows the container of each."""

    QUEUED = "queued"  # submitted, in the engine's inbox
    WAITING = "waiting"  # on the engine thread, waiting for a batch slot
    PREFILLING = "prefilling"  # feeding its prompt, its own batch-1 state in ``state``
    DECODING = "decoding"  # a row of the decode batch
    PAUSED = "paused"  # thinking: out of the batch until its due plan answers, state in ``state``
    DONE = "done"  # its FinishEvent is out and its lease is back


class ActiveSequence:
    def __init__(self, handle: RequestHandle, session: Session | None, tokenizer: Tokenizer):
        req = handle.request
        self.handle = handle
        self.req = req
        self.session = session  # leased for this request by Engine.submit; released when it ends
        self.phase = Phase.QUEUED
        self.state: MambaState | None = None  # while prefilling or paused (in the batch, the batch holds it)
        self.to_feed: list[int] = []
        self.cached = 0
        self.prompt_tokens = len(req.prompt_ids)  # provisional: admission counts the session history in
        self.generated: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopMatcher(req.stop)
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # tokens so far, for the repetition penalty
        self.finished: FinishEvent | None = None
        self.plans = PlanState() if req.think is not None else None
        # the text released so far, kept only for a verifier's verdict at the end (engine.loop.deliberation)
        self.answer: list[str] | None = [] if req.think is not None and req.think.verifier is not None else None

    def admit(self, start: MambaState | None, consumed: int, to_feed: list[int], vocab: int) -> None:
        """Set the start state (``consumed`` tokens already in it) and the tokens to prefill."""
        self.state, self.to_feed = start, to_feed
        self.cached = consumed
        self.prompt_tokens = consumed + len(to_feed)
        self.handle.cached_tokens, self.handle.prompt_tokens = consumed, self.prompt_tokens
        self.generator = self.req.params.make_generator()
        if self.req.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool)
            ids = [t for t in self.req.prompt_ids if 0 <= t < vocab]
            self.seen[torch.tensor(ids, dtype=torch.long)] = True

    # Derived counts ------------------------------------------------------
    @property
    def fed(self) -> int:
        """Generated tokens already in the state (the newest one is pending); -1 before the first."""
        return len(self.generated) - 1

    @property
    def consumed(self) -> int:
        """Tokens in the state so far, the start state's included."""
        return self.prompt_tokens - len(self.to_feed) + max(self.fed, 0)

    @property
    def pending(self) -> list[int]:
        """Tokens not yet in the state: the newest generated one, and prompt tokens not yet prefilled."""
        return self.generated[-1:] + self.to_feed

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled

    # Tokens ---------------------------------------------------------------
    def accept(self, token: int, logprob: float, top: list | None, now: float, eos_id: int | None,
               max_context: int) -> TokenEvent:
        """Book a sampled token; sets :attr:`finished` when it ends the sequence."""
        self.generated.append(token)
        if self.seen is not None and 0 <= token < self.seen.numel():
            self.seen[token] = True
        if (token == eos_id and not self.req.ignore_eos) or token in self.req.stop_token_ids:
            self.finish("stop")
            return TokenEvent(token, "", logprob, top, now)
        text, stopped = self.stops.feed(self.decoder.push(token))
        if self.answer is not None:
            self.answer.append(text)
        if stopped:
            self.finish("stop", flush=False)
        elif len(self.generated) >= self.req.max_tokens or self.consumed + 1 + len(self.to_feed) >= max_context:
            self.finish("length")
        return TokenEvent(token, text, logprob, top, now)

    def finish(self, reason: str, flush: bool = True, error: str | None = None) -> None:
        """Build the FinishEvent (``flush``: release the text held back for stops and partial characters)."""
        tail = ""
        if flush:
            tail = self.stops.feed(self.decoder.flush())[0] + self.stops.held
            if self.answer is not None:
                self.answer.append(tail)
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=len(self.generated),
                      cached_tokens=self.cached, think=self.plans.totals if self.plans is not None else None)
        self.finished = FinishEvent(reason, tail, usage, time.monotonic(), error)
