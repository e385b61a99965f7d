"""The engine loop: one thread owns the model and runs continuous batching.

Requests come in from asyncio code through :meth:`Engine.submit` and go out
as events on an asyncio queue (``loop.call_soon_threadsafe``), so the event
loop never runs torch. Each loop iteration

1. admits waiting requests while fewer than ``max_running`` are running,
   resolving their start state (a leased session, a prefix-cache hit, or
   zeros);
2. prefills at most ``prefill_chunk`` prompt tokens, spread over the
   sequences still prefilling, as one right-padded batch (a long prompt is
   fed over several iterations and does not freeze the streams);
3. decodes one token for every sequence past its prompt, as one batch whose
   states live in the rows ``[0, n)`` of a persistent state buffer;
4. retires finished and cancelled sequences, writing their state back to
   their session (and the prefix cache) and moving the last row into the hole.

Sequences that think (``GenerationRequest.think``) also post a
:class:`~engine.thinking.PlanJob` every ``plan_every`` tokens to the planner
link, and before each decode step the engine lands the planner's deltas that
are due into their batch rows (gated injection, :mod:`engine.injection`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import torch

from engine.injection import DEFAULT_MAX_NORM, land
from engine.models import MambaLMHeadModel
from engine.runtime import keep_freed_memory, share_the_gil_quickly
from engine.sampling import SampleOutput, SamplingParams, sample
from engine.sessions import PrefixCache, Session, SessionStore
from engine.state import MambaState
from engine.thinking import (
    PlanDropped,
    PlanJob,
    PlannerLink,
    StateDelta,
    ThinkParams,
    ThinkTotals,
    ThoughtEvent,
)
from engine.tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later."""


class EngineDead(RuntimeError):
    """The engine thread has stopped."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 16
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    session: Session | None = None  # leased by the caller; released by the engine when the request ends
    prefix_boundaries: Sequence[int] = ()  # chat: token offsets where cached states may be reused / stored
    think: ThinkParams | None = None  # deliberate with the planner while generating


@dataclass
class TokenEvent:
    token_id: int
    text: str  # text released by this token (may be empty: held for a stop string or an unfinished character)
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    time: float


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    think: ThinkTotals | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class FinishEvent:
    reason: str  # "stop", "length", "cancelled" or "error"
    text: str  # text released at the end (held-back text, a final partial character)
    usage: Usage
    time: float
    error: str | None = None


class EngineObserver:
    """Hooks the engine calls from its thread (metrics live outside the engine)."""

    def on_step(self, decode_batch: int, prefill_tokens: int, running: int, waiting: int) -> None: ...

    def on_finish(self, reason: str) -> None: ...

    def on_injection(self, result: str, confidence: float, a_eff: float, realised_lag: int) -> None: ...


class RequestHandle:
    """The caller's side of one request: an async iterator of events, and cancel()."""

    _ids = itertools.count()

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, outbox: dict):
        self._outbox = outbox
        self.id = next(self._ids)
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        """Ask the engine to drop the request; it leaves the batch within one step."""
        self.cancelled.set()

    def _emit(self, event: TokenEvent | ThoughtEvent | FinishEvent) -> None:
        """Queue an event for delivery (engine thread); :meth:`Engine._flush` hands it to the event loop."""
        self._outbox.setdefault(self.loop, []).append((self, event))

    async def events(self) -> AsyncIterator[TokenEvent | ThoughtEvent | FinishEvent]:
        """Events until (and including) the FinishEvent."""
        while True:
            event = await self.queue.get()
            yield event
            if isinstance(event, FinishEvent):
                return


def _deliver(items: list[tuple[RequestHandle, object]]) -> None:
    for handle, event in items:
        handle.queue.put_nowait(event)


class _StopMatcher:
    """Finds stop strings across token boundaries, holding back a possible start of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop string completed)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False


class _Sequence:
    def __init__(self, handle: RequestHandle, tokenizer: Tokenizer, vocab: int):
        req = handle.request
        self.handle = handle
        self.req = req
        self.state: MambaState | None = None  # batch-1 state while prefilling
        self.to_feed: list[int] = []
        self.history = 0  # tokens consumed into the state so far (start state included)
        self.cached = 0  # tokens that were already in the start state (session or prefix cache)
        self.prompt_total = 0  # cached + prompt tokens to feed: the prompt as OpenAI usage counts it
        self.generated: list[int] = []
        self.last_token: int | None = None  # sampled, not yet fed
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = _StopMatcher(req.stop)
        self.generator = req.params.make_generator()
        self.seen = torch.zeros(vocab, dtype=torch.bool) if req.params.repetition_penalty != 1.0 else None
        self.finished: FinishEvent | None = None
        # Thinking: jobs posted and not answered (planned_at -> apply_at), deltas waiting for their step.
        self.last_plan: int | None = None
        self.outstanding: dict[int, int] = {}
        self.deltas: list[StateDelta] = []
        self.totals = ThinkTotals() if req.think is not None else None
        self.paused_since = 0.0

    @property
    def fed(self) -> int:
        """Generated tokens already in the state (the newest sampled one is pending)."""
        return len(self.generated) - 1

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled.is_set()


class Engine:
    def __init__(
        self,
        model: MambaLMHeadModel,
        tokenizer: Tokenizer,
        *,
        max_running: int = 32,
        max_waiting: int = 128,
        prefill_chunk: int = 512,
        max_context: int = 32768,
        sessions: SessionStore | None = None,
        prefix_cache: PrefixCache | None = None,
        observer: EngineObserver | None = None,
        max_state_norm: float = DEFAULT_MAX_NORM,
    ):
        keep_freed_memory()
        share_the_gil_quickly()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.max_context = max_context
        self.sessions = sessions if sessions is not None else SessionStore()
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()
        self.observer = observer or EngineObserver()
        self.planner: PlannerLink | None = None  # see attach_planner
        self.max_state_norm = max_state_norm
        self._thinking: dict[int, _Sequence] = {}  # request id -> sequence, for those that think
        self._results: collections.deque[StateDelta | PlanDropped] = collections.deque()
        self._results_ready = threading.Condition()
        self.vocab = model.config.vocab_size
        self.eos_id = tokenizer.eos_id
        self._inbox: collections.deque[RequestHandle] = collections.deque()
        self._wake = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._prefilling: list[_Sequence] = []
        self._decoding: list[_Sequence] = []  # row i of self._batch belongs to self._decoding[i]
        self._paused: list[_Sequence] = []  # thinking sequences waiting out of the batch for a due plan
        self._batch: MambaState | None = None
        # Events of the current step, per event loop: delivered with one call_soon_threadsafe
        # per loop and step rather than one per token (each wakes the loop and takes the GIL).
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, object]]] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self.ready = threading.Event()
        self.error: BaseException | None = None

    # Lifecycle ----------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="crsm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._prefilling) + len(self._decoding) + len(self._paused)

    # Submission (any thread, usually the event loop) ----------------------
    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; raises EngineOverloaded past ``max_waiting`` and EngineDead if stopped."""
        if not self.alive:
            raise EngineDead("the engine thread is not running")
        if not request.prompt_ids and (request.session is None or not request.session.pending):
            raise ValueError("nothing to feed: the prompt is empty")
        handle = RequestHandle(request, loop or asyncio.get_running_loop(), self._outbox)
        with self._wake:
            if self.num_running + self.num_waiting >= self.max_running + self.max_waiting:
                raise EngineOverloaded(f"{self.num_running} running and {self.num_waiting} waiting")
            self._inbox.append(handle)
            self._wake.notify()
        return handle

    def attach_planner(self, link: PlannerLink) -> None:
        """Send the plan jobs of thinking requests to ``link``; its results come back through :meth:`post_result`."""
        if self.alive:
            raise RuntimeError("attach the planner before the engine starts")
        link.connect(self.post_result)
        self.planner = link

    def post_result(self, result: StateDelta | PlanDropped) -> None:
        """A planner's answer to a PlanJob (any thread); landed at the step it is due."""
        with self._results_ready:
            self._results.append(result)
            self._results_ready.notify()

    # The loop (engine thread) ---------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._warm_up()
                self.ready.set()
                while True:
                    with self._wake:
                        while not self._stop and not self._inbox and not self._has_work():
                            self._wake.wait(timeout=0.5)
                        if self._stop:
                            break
                        incoming = list(self._inbox)
                        self._inbox.clear()
                    for handle in incoming:
                        self._waiting.append(_Sequence(handle, self.tokenizer, self.vocab))
                    try:
                        self._iteration()
                    except Exception as exc:  # a step failed: fail the requests in flight, keep serving
                        log.exception("engine step failed")
                        self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
                    self._flush()
        except BaseException as exc:  # noqa: BLE001 - the thread must report, not vanish
            log.exception("engine thread died")
            self.error = exc
            self._fail_all(f"engine failure: {exc}")
            self._flush()
        finally:
            self.ready.clear()

    def _flush(self) -> None:
        while self._outbox:
            loop, items = self._outbox.popitem()
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody listens to these requests any more
                for handle, _ in items:
                    handle.cancelled.set()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding or self._paused)

    def _warm_up(self) -> None:
        logits, state = self.model.prefill(torch.tensor([[0, 1, 2]]))
        self.model.step(logits.argmax(-1), state)

    def _iteration(self) -> None:
        self._drop_cancelled()
        if self._paused:
            self._resume_planned()
        self._admit()
        prefill_tokens = self._prefill_some()
        decode_batch = len(self._decoding)
        if self._decoding:
            self._decode_step()
        self.observer.on_step(decode_batch, prefill_tokens, self.num_running, self.num_waiting)

    # Admission and start states -----------------------------------------
    def _admit(self) -> None:
        while self._waiting and self.num_running < self.max_running:
            seq = self._waiting.popleft()
            req = seq.req
            if req.session is not None:
                seq.state = req.session.state.clone() if req.session.state is not None else None
                seq.to_feed = list(req.session.pending) + list(req.prompt_ids)
                seq.history = req.session.n_tokens - len(req.session.pending)
            elif req.prefix_boundaries:
                # A state is only useful with tokens left to feed: the next logits come from feeding them.
                usable = [b for b in req.prefix_boundaries if b < len(req.prompt_ids)]
                entry = self.prefix_cache.longest(req.prompt_ids, usable)
                if entry is not None:
                    seq.state = entry.state
                    seq.to_feed = entry.pending + list(req.prompt_ids[entry.n_tokens :])
                    seq.history = entry.n_tokens - len(entry.pending)
                else:
                    seq.to_feed = list(req.prompt_ids)
            else:
                seq.to_feed = list(req.prompt_ids)
            if not seq.to_feed:  # cannot happen through submit(); never let it reach the batch
                self._finish(seq, "error", flush=False, error="nothing to feed")
                self._retire(seq, None)
                continue
            seq.cached = seq.history
            seq.prompt_total = seq.history + len(seq.to_feed)
            if seq.totals is not None:
                self._thinking[seq.handle.id] = seq
            if seq.seen is not None:
                seq.seen[torch.tensor([t for t in req.prompt_ids if 0 <= t < self.vocab], dtype=torch.long)] = True
            self._prefilling.append(seq)

    # Prefill --------------------------------------------------------------
    def _prefill_some(self) -> int:
        """Feed up to ``prefill_chunk`` prompt tokens, oldest sequences first, as one batch."""
        budget = self.prefill_chunk
        chosen: list[tuple[_Sequence, int]] = []
        for seq in self._prefilling:
            if budget <= 0:
                break
            n = min(len(seq.to_feed), budget)
            chosen.append((seq, n))
            budget -= n
        if not chosen:
            return 0
        width = max(n for _, n in chosen)
        ids = torch.zeros(len(chosen), width, dtype=torch.long)
        for row, (seq, n) in enumerate(chosen):
            ids[row, :n] = torch.tensor(seq.to_feed[:n])
        lengths = torch.tensor([n for _, n in chosen])
        start = MambaState.gather(
            [seq.state if seq.state is not None else self.model.allocate_state(1) for seq, _ in chosen]
        )
        logits, state = self.model.prefill(ids, lengths=lengths, state=start)
        done_rows = []
        for row, (seq, n) in enumerate(chosen):
            seq.state = state.select([row])
            seq.history += n
            del seq.to_feed[:n]
            if not seq.to_feed:
                done_rows.append(row)
        if done_rows:
            finished = [chosen[r][0] for r in done_rows]
            for seq in finished:
                self._prefilling.remove(seq)
            self._accept_all(finished, self._sample(finished, logits[done_rows]))
            for row, seq in zip(done_rows, finished):
                if seq.finished is None:
                    self._join_decode(seq)
                    if seq.totals is not None:
                        self._plan(seq, len(self._decoding) - 1, logits[row])
                else:
                    self._retire(seq, seq.state)
        return int(lengths.sum())

    # Decode ---------------------------------------------------------------
    def _join_decode(self, seq: _Sequence) -> None:
        row = len(self._decoding)
        if self._batch is None or self._batch.batch_size <= row:
            capacity = max(self.max_running, row + 1)
            grown = self.model.allocate_state(capacity)
            if self._batch is not None and row > 0:
                grown.write_rows(list(range(row)), self._batch.select(list(range(row))))
            self._batch = grown
        self._batch.write_rows([row], seq.state)
        seq.state = None
        self._decoding.append(seq)

    def _batch_view(self, n: int) -> MambaState:
        return MambaState(self._batch.conv[:, :n], self._batch.ssm[:, :n])

    def _decode_step(self) -> None:
        if self._thinking:
            self._collect_results()
            self._pause_for_plans()
            self._land_deltas()
            if not self._decoding:
                return
        seqs = self._decoding
        n = len(seqs)
        tokens = torch.tensor([s.last_token for s in seqs])
        logits = self.model.step(tokens, self._batch_view(n))
        for seq in seqs:
            seq.history += 1  # last_token is now in the state
        self._accept_all(seqs, self._sample(seqs, logits))
        if self._thinking:
            for row, seq in enumerate(seqs):
                if seq.totals is not None and seq.finished is None:
                    self._plan(seq, row, logits[row])
        for seq in [s for s in seqs if s.finished is not None]:
            self._leave_decode(seq)

    def _leave_decode(self, seq: _Sequence) -> None:
        row = self._decoding.index(seq)
        state = self._batch.select([row])
        self._remove_row(row)
        self._retire(seq, state)

    def _remove_row(self, row: int) -> None:
        """Drop a sequence from the batch, moving the last row into the hole."""
        last = len(self._decoding) - 1
        if row != last:
            self._batch.write_rows([row], self._batch.select([last]))
            self._decoding[row] = self._decoding[last]
        self._decoding.pop()

    def _sample(self, seqs: Sequence[_Sequence], logits: torch.Tensor) -> SampleOutput:
        seen = None
        if any(s.seen is not None for s in seqs):
            seen = torch.stack([s.seen if s.seen is not None else torch.zeros(self.vocab, dtype=torch.bool) for s in seqs])
        return sample(logits, [s.req.params for s in seqs], [s.generator for s in seqs], seen=seen)

    # Thinking: jobs out, deltas in ------------------------------------------
    def _plan(self, seq: _Sequence, row: int, logits: torch.Tensor) -> None:
        """Post a job for ``seq`` (decoding in ``row``) if one is due; its pending token came from ``logits``."""
        params = seq.req.think
        fed = seq.fed
        if self.planner is None or (seq.last_plan is not None and fed - seq.last_plan < params.plan_every):
            return
        job = PlanJob(seq.handle.id, fed, self._batch.select([row]), logits.detach().clone(), list(seq.generated),
                      params)
        seq.last_plan = fed
        seq.outstanding[fed] = job.apply_at
        seq.totals.plans += 1
        self.planner.submit(job)

    def _collect_results(self) -> None:
        with self._results_ready:
            results = list(self._results)
            self._results.clear()
        for result in results:
            seq = self._thinking.get(result.request_id)
            if seq is None or seq.outstanding.pop(result.planned_at, None) is None:
                continue  # the sequence has ended, or this job was already given up
            if isinstance(result, StateDelta):
                seq.totals.simulations += result.simulations
                seq.deltas.append(result)
            else:
                self._thought(seq, ThoughtEvent(result.planned_at, None, result.outcome, 0.0, 0.0, 0.0, [], 0,
                                                time.monotonic()))

    def _due_jobs(self, seq: _Sequence) -> list[int]:
        """planned_at of the jobs of a waiting sequence that must answer before its next step."""
        if not seq.req.think.synchronous:
            return []
        return [t for t, apply_at in seq.outstanding.items() if apply_at <= seq.fed]

    def _pause_for_plans(self) -> None:
        """Bounded lag: a sequence whose due plan has not answered leaves the batch until it does.

        Only that sequence waits; the others keep decoding.
        """
        for seq in [s for s in self._decoding if s.totals is not None and self._due_jobs(s)]:
            row = self._decoding.index(seq)
            seq.state = self._batch.select([row])
            self._remove_row(row)
            seq.paused_since = time.monotonic()
            self._paused.append(seq)

    def _resume_planned(self) -> None:
        """Paused sequences whose plans have answered (or given up) land them and rejoin the batch."""
        self._collect_results()
        now = time.monotonic()
        for seq in list(self._paused):
            due = self._due_jobs(seq)
            if due and now - seq.paused_since < seq.req.think.max_wait_s:
                continue
            for planned_at in due:
                seq.outstanding.pop(planned_at, None)
                self._thought(seq, ThoughtEvent(planned_at, None, "timeout", 0.0, 0.0, 0.0, [], 0, now))
            self._paused.remove(seq)
            self._land_due(seq, seq.state.ssm[:, 0])
            self._join_decode(seq)
        if self._paused and not self._decoding and not self._prefilling:
            with self._results_ready:  # nothing else to do: sleep until a plan answers
                if not self._results:
                    self._results_ready.wait(timeout=0.005)

    def _land_deltas(self) -> None:
        """Blend every due delta into its sequence's batch row, just before the step that reads it."""
        for row, seq in enumerate(self._decoding):
            if seq.deltas:
                self._land_due(seq, self._batch.ssm[:, row])

    def _land_due(self, seq: _Sequence, h: torch.Tensor) -> None:
        fed = seq.fed
        due = sorted((d for d in seq.deltas if d.apply_at <= fed), key=lambda d: d.planned_at)
        seq.deltas = [d for d in seq.deltas if d.apply_at > fed]
        for delta in due:
            self._land(seq, h, delta, fed)

    def _land(self, seq: _Sequence, h: torch.Tensor, delta: StateDelta, fed: int) -> None:
        """Blend one delta into ``h`` (the sequence's live SSM state, (n_layer, d_inner, d_state))."""
        lag = fed - delta.planned_at
        taken = seq.generated[delta.planned_at : fed + 1]  # tokens fed since planned_at, and the pending one
        landing = land(h, delta, taken, lag, seq.req.think, self.max_state_norm)
        self.observer.on_injection(landing.result, landing.confidence, landing.a_eff, lag)
        self._thought(seq, ThoughtEvent(delta.planned_at, fed, landing.result, landing.confidence, landing.a_eff,
                                        landing.delta_norm, delta.path, delta.simulations, time.monotonic()))

    def _thought(self, seq: _Sequence, event: ThoughtEvent) -> None:
        seq.totals.count(event.outcome)
        seq.handle._emit(event)

    def _forget_plans(self, seq: _Sequence) -> None:
        if self._thinking.pop(seq.handle.id, None) is not None and self.planner is not None:
            self.planner.discard(seq.handle.id)
        seq.deltas.clear()
        seq.outstanding.clear()

    # Token bookkeeping -----------------------------------------------------
    def _accept_all(self, seqs: Sequence[_Sequence], out: SampleOutput) -> None:
        """Book one sampled token per sequence (tensors converted to Python once per step)."""
        tokens, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        now = time.monotonic()
        for row, seq in enumerate(seqs):
            k = seq.req.params.logprobs
            top = list(zip(top_ids[row][:k], top_lps[row][:k])) if top_ids is not None and k else None
            self._accept(seq, tokens[row], logprobs[row], top, now)

    def _accept(self, seq: _Sequence, token: int, logprob: float, top: list | None, now: float) -> None:
        seq.generated.append(token)
        seq.last_token = token
        if seq.seen is not None and token < self.vocab:
            seq.seen[token] = True
        if (token == self.eos_id and not seq.req.ignore_eos) or token in seq.req.stop_token_ids:
            seq.handle._emit(TokenEvent(token, "", logprob, top, now))
            self._finish(seq, "stop")
            return
        text, stopped = seq.stops.feed(seq.decoder.push(token))
        seq.handle._emit(TokenEvent(token, text, logprob, top, now))
        if stopped:
            self._finish(seq, "stop", flush=False)
        elif len(seq.generated) >= seq.req.max_tokens or seq.history + 1 + len(seq.to_feed) >= self.max_context:
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: str, flush: bool = True, error: str | None = None) -> None:
        tail = ""
        if flush:
            tail = seq.stops.feed(seq.decoder.flush())[0] + seq.stops.held
        usage = Usage(prompt_tokens=seq.prompt_total, completion_tokens=len(seq.generated), cached_tokens=seq.cached,
                      think=seq.totals)
        seq.finished = FinishEvent(reason, tail, usage, time.monotonic(), error)

    def _retire(self, seq: _Sequence, state: MambaState | None) -> None:
        """Hand the final event out and write the state back where it belongs."""
        pending = ([seq.last_token] if seq.last_token is not None else []) + seq.to_feed
        req = seq.req
        if seq.totals is not None:
            self._forget_plans(seq)
        if req.session is not None:
            if state is None:
                self.sessions.release(req.session)
            else:
                self.sessions.release(req.session, state=state, pending=pending, n_tokens=seq.history + len(pending))
        elif req.prefix_boundaries and state is not None and seq.finished.reason in ("stop", "length"):
            self.prefix_cache.put(list(req.prompt_ids) + seq.generated, state, pending=pending)
        self.observer.on_finish(seq.finished.reason)
        seq.handle._emit(seq.finished)

    # Cancellation and failure ---------------------------------------------
    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled", flush=False)
            seq.to_feed = []
            seq.last_token = None
            self._retire(seq, None)
        for seq in [s for s in self._prefilling if s.cancelled]:
            self._prefilling.remove(seq)
            self._finish(seq, "cancelled", flush=False)
            self._retire(seq, seq.state)
        for seq in [s for s in self._decoding if s.cancelled]:
            self._finish(seq, "cancelled", flush=False)
            self._leave_decode(seq)
        for seq in [s for s in self._paused if s.cancelled]:
            self._paused.remove(seq)
            self._finish(seq, "cancelled", flush=False)
            self._retire(seq, seq.state)

    def _fail_all(self, message: str) -> None:
        for seq in list(self._waiting) + self._prefilling + self._decoding + self._paused:
            if seq.totals is not None:
                self._forget_plans(seq)
            if seq.req.session is not None:
                self.sessions.release(seq.req.session)
            usage = Usage(len(seq.req.prompt_ids), len(seq.generated), 0)
            seq.handle._emit(FinishEvent("error", "", usage, time.monotonic(), message))
        with self._wake:
            orphans = list(self._inbox)
            self._inbox.clear()
        for handle in orphans:
            if handle.request.session is not None:
                self.sessions.release(handle.request.session)
            handle._emit(FinishEvent("error", "", Usage(len(handle.request.prompt_ids), 0, 0), time.monotonic(), message))
        self._waiting.clear()
        self._prefilling.clear()
        self._decoding.clear()
        self._paused.clear()
        self._batch = None
