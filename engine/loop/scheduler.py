"""The engine loop: one thread owns the model and runs continuous batching.

Requests come in from asyncio code through :meth:`Engine.submit` and go out
as events on the caller's event loop (:mod:`engine.requests`), so the event
loop never runs torch. Each loop iteration

1. admits waiting requests while fewer than ``max_running`` are running,
   resolving their start state (the leased session's, a prefix-cache hit, or
   zeros);
2. prefills at most ``prefill_chunk`` prompt tokens, spread over the
   sequences still prefilling, as one right-padded batch (a long prompt is
   fed over several iterations and does not freeze the streams);
3. decodes one token for every sequence past its prompt, as one batch
   (:mod:`engine.loop.batch`);
4. retires finished and cancelled sequences: their final event goes out,
   their state goes back to their session (or the prefix cache) and the
   session's lease is released.

Where each request sits is :mod:`engine.loop.inflight`'s job. The engine owns a
session's lease for the whole request: :meth:`Engine.submit` takes it and
:meth:`Engine._retire` (the one way out, whatever the ending) gives it back.
Requests that think exchange plans and deltas with a planner
(:mod:`engine.loop.deliberation`). A failure caused by one request ends that
request alone (rows are retried apart where they are independent).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch

from engine.loop.batch import DecodeBatch, prefill_rows, sample_rows
from engine.loop.deliberation import Deliberation, held
from engine.loop.inflight import InFlight
from engine.loop.injection import DEFAULT_MAX_NORM
from engine.loop.sequence import ActiveSequence, Phase
from engine.loop.writeback import WriteBehind
from engine.models import MambaLMHeadModel
from engine.requests import (
    ContextLengthExceeded,
    EmptyPrompt,
    EngineDead,
    EngineObserver,
    EngineOverloaded,
    FinishEvent,
    GenerationRequest,
    Outbox,
    RequestHandle,
    check_request,
)
from engine.runtime import keep_freed_memory, share_the_gil_quickly
from engine.sessions import PrefixCache, Session, SessionBackend, SessionStore, start_state
from engine.state import MambaState
from engine.text.tokenizer import Tokenizer
from engine.thinking import PlanDropped, PlannerLink, StateDelta

log = logging.getLogger(__name__)


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
        sessions: SessionBackend | None = None,  # any store: memory (default), directory, Redis
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
        self.vocab = model.config.vocab_size
        self.eos_id = tokenizer.eos_id
        self._outbox = Outbox()
        # persistent stores write on their own thread (engine/loop/writeback.py), handed over at each flush
        self._writer = WriteBehind() if getattr(self.sessions, "persistent", False) else None
        self._writes: list[Callable[[Outbox], None]] = []
        self._deliberation = Deliberation(self.observer, self._outbox.emit, max_state_norm)
        self._flight = InFlight(DecodeBatch(model, max_running))  # where each request sits
        self._accepting = True  # False once the loop has ended: nothing may join the inbox after its last drain
        self._stop = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()

    # Lifecycle ----------------------------------------------------------
    def attach_planner(self, link: PlannerLink) -> None:
        """Send the plan jobs of thinking requests to ``link``; its results come back through :meth:`post_result`."""
        if self.alive:
            raise RuntimeError("attach the planner before the engine starts")
        link.connect(self.post_result)
        self._deliberation.link = link

    @property
    def planner(self) -> PlannerLink | None:
        return self._deliberation.link

    def post_result(self, result: StateDelta | PlanDropped) -> None:
        """A planner's answer to a PlanJob (any thread); landed at the step it is due."""
        self._deliberation.post_result(result)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="crsm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still in flight end with an error event."""
        with self._flight.wake:
            self._stop = True
            self._flight.wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._writer is not None:  # the final events of the last requests leave after their writes
            self._writer.close(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Block until the model is warm; :class:`EngineDead` if the thread stops first, TimeoutError past ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if not self.alive:
                raise EngineDead("the engine thread stopped before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine was not ready within {timeout} s")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return self._flight.num_waiting

    @property
    def num_running(self) -> int:
        return self._flight.num_running

    # Submission (any thread, usually the event loop) ----------------------
    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; from here on it ends with exactly one FinishEvent and its session's lease back.

        Raises before queuing (holding no lease): :class:`~engine.sessions.SessionNotFound` /
        :class:`~engine.sessions.SessionBusy` for ``session_id``, :class:`InvalidRequest`, :class:`EmptyPrompt`,
        :class:`ContextLengthExceeded`, :class:`EngineOverloaded` past ``max_waiting``, :class:`EngineDead`.
        """
        if not self.alive:
            raise EngineDead("the engine thread is not running")
        check_request(request, self.vocab, self.max_context)
        session = self.sessions.lease(request.session_id, request.owner) if request.session_id is not None else None
        try:
            history = session.n_tokens if session is not None else 0
            if not request.prompt_ids and not (session is not None and session.pending):
                raise EmptyPrompt("the prompt is empty")
            if history + len(request.prompt_ids) >= self.max_context:
                raise ContextLengthExceeded(history, len(request.prompt_ids), self.max_context)
            handle = RequestHandle(request, loop or asyncio.get_running_loop())
            seq = ActiveSequence(handle, session, self.tokenizer)
            with self._flight.wake:
                if not self._accepting:
                    raise EngineDead("the engine thread has stopped")
                if self.num_running + self.num_waiting >= self.max_running + self.max_waiting:
                    raise EngineOverloaded(f"{self.num_running} running and {self.num_waiting} waiting")
                self._flight.inbox.append(seq)
                self._flight.wake.notify()
        except BaseException:
            if session is not None:
                self.sessions.release(session)
            raise
        return handle

    # The loop (engine thread) ---------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._warm_up()
                self.ready.set()
                while self._next_arrivals():
                    try:
                        self._iteration()
                    except Exception as exc:  # a step failed: fail the requests in flight, keep serving
                        log.exception("engine step failed")
                        self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
                    self._flush()
            message = "the engine is shutting down"
        except BaseException as exc:  # noqa: BLE001 - the thread must report, not vanish
            log.exception("engine thread died")
            message = f"engine failure: {exc}"
        finally:
            self.ready.clear()
        with self._flight.wake:
            self._accepting = False
        self._fail_all(message)
        self._flush()

    def _next_arrivals(self) -> bool:
        """Wait for work, move new requests to the waiting queue; False when asked to stop."""
        with self._flight.wake:
            while not self._stop and not self._flight.inbox and not self._flight.has_work():
                self._flight.wake.wait(timeout=0.5)
            if self._stop:
                return False
            self._flight.take_arrivals()
        return True

    def _warm_up(self) -> None:
        logits, state = self.model.prefill(torch.tensor([[0, 1, 2]]))
        self.model.step(logits.argmax(-1), state)

    def _iteration(self) -> None:
        self._drop_cancelled()
        if self._flight.paused:
            self._resume_planned()
        self._admit()
        prefill_tokens = self._prefill_some()
        self._flush()  # a prompt's first token leaves now, not with the next decode step's token
        decode_batch = len(self._flight.batch)
        if self._flight.batch:
            self._decode_step()
        self.observer.on_step(decode_batch, prefill_tokens, self.num_running, self.num_waiting)

    # Admission and start states -----------------------------------------
    def _admit(self) -> None:
        while self._flight.waiting and self.num_running < self.max_running:
            seq = self._flight.waiting.popleft()
            seq.admit(*start_state(seq.req.prompt_ids, seq.req.prefix_boundaries, seq.session, self.prefix_cache),
                      vocab=self.vocab)
            self._flight.to_prefill(seq)
            if seq.plans is not None:
                self._deliberation.begin(seq)

    # Prefill --------------------------------------------------------------
    def _prefill_some(self) -> int:
        """Feed up to ``prefill_chunk`` prompt tokens, oldest sequences first, as one batch.

        A thinking sequence keeps its last prompt token back (:func:`engine.loop.deliberation.held`): it joins the
        decode batch with that token pending, so a plan can land on the step that chooses its first token.
        """
        budget = self.prefill_chunk
        chosen: list[tuple[ActiveSequence, int]] = []
        fed_already: list[ActiveSequence] = []  # only the held token is left
        for seq in self._flight.prefilling:
            if budget <= 0:
                break
            n = min(len(seq.to_feed) - held(seq), budget)
            if n <= 0:
                fed_already.append(seq)
                continue
            chosen.append((seq, n))
            budget -= n
        done = self._prefill(chosen) if chosen else []
        first = [(seq, logits) for seq, logits in done if not held(seq)]
        if first:
            self._first_tokens([seq for seq, _ in first], torch.stack([logits for _, logits in first]))
        for seq, logits in [(seq, logits) for seq, logits in done if held(seq)] + [(s, None) for s in fed_already]:
            self._to_decide(seq, logits)
        return sum(n for _, n in chosen)

    def _prefill(self, chosen: list[tuple[ActiveSequence, int]]) -> list[tuple[ActiveSequence, torch.Tensor]]:
        """One prefill chunk; (sequence, logits) of those whose prompt is all in.

        Rows are independent here (each from its own start state, nothing
        written before the forward succeeds), so when the batch fails each row
        runs alone and only a row that fails alone ends, with an error.
        """
        try:
            logits = prefill_rows(self.model, chosen)
        except Exception as exc:
            if len(chosen) > 1:
                return [done for one in chosen for done in self._prefill([one])]
            seq = chosen[0][0]
            self._fail_row(seq, "prefill", exc)
            self._retire(seq, self._flight.detach(seq))
            return []
        return [(seq, logits[row]) for row, (seq, _) in enumerate(chosen) if len(seq.to_feed) == held(seq)]

    def _first_tokens(self, seqs: list[ActiveSequence], logits: torch.Tensor) -> None:
        """Sequences whose prompt is all in: sample their first token, move them to the decode batch."""
        self._sample_and_accept(seqs, logits)
        for seq, row_logits in zip(seqs, logits):
            state = self._flight.detach_running(seq)
            if seq.finished is not None:
                self._retire(seq, state)
                continue
            row = self._flight.to_decode(seq, state)
            if seq.plans is not None:
                self._deliberation.maybe_plan(seq, partial(self._flight.batch.copy_row, row), row_logits)

    def _to_decide(self, seq: ActiveSequence, logits: torch.Tensor | None) -> None:
        """A thinking sequence with only its held prompt token left joins the decode batch; its first plan goes out.

        ``logits`` (after the prompt's other tokens, or None when there were none to feed) only give the
        plan's root priors: the held token is the plan's forced first move.
        """
        state = self._flight.detach(seq)
        row = self._flight.to_decode(seq, state if state is not None else self.model.allocate_state(1))
        root = logits if logits is not None else torch.zeros(self.vocab)
        self._deliberation.maybe_plan(seq, partial(self._flight.batch.copy_row, row), root)

    # Decode ---------------------------------------------------------------
    def _decode_step(self) -> None:
        if self._deliberation.active:
            self._deliberation.collect()
            self._pause_for_plans()
            for row, seq in enumerate(self._flight.batch):
                if seq.plans is not None:
                    self._deliberation.land_due(seq, self._flight.batch.ssm_row(row))
            if not self._flight.batch:
                return
        seqs = list(self._flight.batch)
        tokens = torch.tensor([s.generated[-1] if s.generated else s.to_feed[-1] for s in seqs])
        try:
            logits = self.model.step(tokens, self._flight.batch.live())
        except Exception as exc:  # the shared forward: no row to blame, and the rows' states are half-written
            for seq in seqs:
                self._fail_row(seq, "decode step", exc)
                self._retire(seq, self._flight.detach(seq))
            return
        for seq in seqs:
            if not seq.generated:  # a thinking sequence's held prompt token is in now
                seq.to_feed.clear()
        self._sample_and_accept(seqs, logits)
        if self._deliberation.active:
            for row, seq in enumerate(seqs):
                if seq.plans is not None and seq.finished is None:
                    self._deliberation.maybe_plan(seq, partial(self._flight.batch.copy_row, row), logits[row])
        for seq in [s for s in seqs if s.finished is not None]:
            self._retire(seq, self._flight.detach(seq))

    def _pause_for_plans(self) -> None:
        """Bounded lag: a sequence whose due plan has not answered leaves the batch until it does.

        Only that sequence waits; the others keep decoding.
        """
        for seq in [s for s in self._flight.batch if s.plans is not None and self._deliberation.must_wait(s)]:
            self._flight.to_paused(seq, self._flight.detach_running(seq))

    def _resume_planned(self) -> None:
        """Paused sequences whose plans have answered (or given up) land them and rejoin the batch."""
        self._deliberation.collect()
        now = time.monotonic()
        for seq in [s for s in self._flight.paused if self._deliberation.may_resume(s, now)]:
            state = self._flight.detach_running(seq)
            self._deliberation.land_due(seq, state.ssm[:, 0])
            self._flight.to_decode(seq, state)
        if self._flight.paused and not self._flight.batch and not self._flight.prefilling:
            self._deliberation.wait_for_results(timeout=0.005)  # nothing else to do: sleep until a plan answers

    # Sampling and token bookkeeping ---------------------------------------
    def _sample_and_accept(self, seqs: Sequence[ActiveSequence], logits: torch.Tensor) -> None:
        """Sample one token per sequence from its row of ``logits`` and book it (Python lists once per step).

        Sampling has no side effects on the rows, so when the batch fails each
        row is sampled alone and only a row that fails alone ends, with an error.
        """
        try:
            out = sample_rows(seqs, logits, self.vocab)
        except Exception as exc:
            if len(seqs) == 1:
                self._fail_row(seqs[0], "sampling", exc)
            else:
                for i, seq in enumerate(seqs):
                    self._sample_and_accept([seq], logits[i : i + 1])
            return
        tokens, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        now = time.monotonic()
        for row, seq in enumerate(seqs):
            k = seq.req.params.logprobs
            top = list(zip(top_ids[row][:k], top_lps[row][:k])) if top_ids is not None and top_lps is not None and k \
                else None
            try:
                event = seq.accept(tokens[row], logprobs[row], top, now, self.eos_id, self.max_context)
            except Exception as exc:
                self._fail_row(seq, "accepting a token", exc)
                continue
            self._outbox.emit(seq.handle, event)

    # Endings ----------------------------------------------------------------
    def _fail_row(self, seq: ActiveSequence, what: str, exc: Exception) -> None:
        """End one sequence with an error (the caller retires it); the others are untouched."""
        log.warning("request %s: %s failed: %s: %s", seq.handle.id, what, type(exc).__name__, exc)
        seq.finish("error", flush=False, error=f"{what} failed: {type(exc).__name__}: {exc}")

    def _retire(self, seq: ActiveSequence, state: MambaState | None) -> None:
        """The one way out: the lease goes back, then the final event goes out.

        The session (or prefix cache) takes ``state`` unless the request failed:
        a failed request leaves its session as it was before it.
        """
        req, finish = seq.req, seq.finished
        assert finish is not None, "a sequence is retired once its final event is built"
        state = None if finish.reason == "error" else state
        seq.phase = Phase.DONE
        deferred = False
        try:
            if seq.plans is not None:
                self._deliberation.end(seq, lambda: self.tokenizer.decode(list(req.prompt_ids)))
            if seq.session is not None and self._writer is not None:
                self._write_behind(seq, seq.session, finish, state)
                deferred = True
            elif seq.session is not None:
                self._write_back(seq, seq.session, state)
            elif req.prefix_boundaries and state is not None and finish.reason in ("stop", "length"):
                self.prefix_cache.put(list(req.prompt_ids) + seq.generated, state, pending=seq.pending)
        except Exception:  # the store refused the state (e.g. over its budget): the request still ends
            log.exception("could not write back the state of request %s", seq.handle.id)
        finally:
            self.observer.on_finish(finish.reason)
            if not deferred:
                self._outbox.emit(seq.handle, finish)

    def _flush(self) -> None:
        """Send this step's events; then hand the step's session writes over (their final events follow them)."""
        self._outbox.flush()
        writes, self._writes = self._writes, []
        for write in writes:
            assert self._writer is not None  # only _write_behind queues writes, and only with a writer
            self._writer.submit(write)

    def _write_back(self, seq: ActiveSequence, session: Session, state: MambaState | None) -> None:
        """The session takes ``state`` (if any) and the lease goes back, whatever the store says."""
        if state is None:
            self.sessions.release(session)
        else:
            self.sessions.release(session, state=state, pending=seq.pending,
                                  n_tokens=seq.consumed + len(seq.pending))

    def _write_behind(self, seq: ActiveSequence, session: Session, finish: FinishEvent,
                      state: MambaState | None) -> None:
        """:meth:`_write_back` on the writer thread, then the final event (the lease is idle when it arrives)."""
        def write(outbox: Outbox) -> None:
            try:
                self._write_back(seq, session, state)
            except Exception:  # the store refused the state (over its budget, unreachable): the request still ends
                log.exception("could not write back the state of request %s", seq.handle.id)
            finally:
                outbox.emit(seq.handle, finish)
        self._writes.append(write)

    def _drop_cancelled(self) -> None:
        for seq in self._flight.all():
            if seq.cancelled and seq.phase is not Phase.QUEUED:  # queued ones are seen next iteration
                state = self._flight.detach(seq)
                seq.finish("cancelled", flush=False)
                self._retire(seq, state)

    def _fail_all(self, message: str) -> None:
        """End every request in flight with an error event; their sessions keep the state they had."""
        seqs = self._flight.all()
        for seq in seqs:
            try:
                self._flight.detach(seq)
            except Exception:  # a broken batch buffer: dropped below
                log.exception("could not detach request %s", seq.handle.id)
        self._flight.batch.clear()
        for seq in seqs:
            seq.finish("error", flush=False, error=message)
            self._retire(seq, None)
