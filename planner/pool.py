"""The planner pool: asyncio workers, each driving one planner process.

The engine thread hands jobs over with :meth:`PlannerPool.submit` (never
blocking: the job hops onto the event loop). Each request (one generating
sequence) is routed to one worker by its ``request_id``, so its tree stays in
one process and is reused. A worker's queue keeps the newest job per request
(an older one still waiting is dropped as ``superseded``) and the pool holds
at most ``max_pending`` jobs (past that the oldest goes, as ``overflow``). A
worker takes up to ``max_batch`` jobs of different requests and searches them
as one batch in its process.

Failures never reach a stream: a search that raises is answered ``error``;
a process that dies is replaced (``error``); a call that overruns its hang
limit (``hang_factor`` x the time budget + ``hang_grace_s``) gets its process
killed and replaced (``timeout``). Every job gets an answer, a
:class:`~engine.thinking.StateDelta` or a :class:`~engine.thinking.PlanDropped`,
posted to the engine through ``post``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from engine.thinking import PlanDropped, PlanJob, StateDelta
from planner.verifiers import judge
from planner.worker import WorkerSpec, delta_from_wire, job_to_wire, worker_main

log = logging.getLogger(__name__)


class PlannerObserver:
    """Metrics hooks (called on the event loop)."""

    def on_planner_job(self, outcome: str, seconds: float = 0.0, simulations: int = 0) -> None: ...


class WorkerFailed(RuntimeError):
    def __init__(self, outcome: str, message: str):
        super().__init__(message)
        self.outcome = outcome


class _Process:
    """One worker process and the parent's end of its pipe (used from one thread at a time)."""

    def __init__(self, spec: WorkerSpec, target: Callable, start_timeout: float):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, spec), daemon=True, name="crsm-planner")
        self.proc.start()
        child.close()
        self.info: dict = {}
        if not self.conn.poll(start_timeout):
            self.kill()
            raise WorkerFailed("error", f"planner worker not ready after {start_timeout:.0f}s")
        try:
            kind, self.info = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.kill()
            raise WorkerFailed("error", f"planner worker died while starting ({exc})") from exc

    def call(self, message: tuple, timeout: float) -> tuple:
        try:
            self.conn.send(message)
            if not self.conn.poll(timeout):
                raise WorkerFailed("timeout", f"planner worker did not answer within {timeout:.2f}s")
            return self.conn.recv()
        except (EOFError, OSError) as exc:
            raise WorkerFailed("error", f"planner worker died ({type(exc).__name__})") from exc

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        """Ask the worker to exit, then kill it: it holds nothing worth waiting for, and a stop must fit inside the
        container's stop grace (a niced worker on a loaded machine took seconds to be scheduled and exit)."""
        try:
            self.conn.send(("stop",))
        except OSError:
            pass
        self.proc.join(timeout=0.5)
        self.kill()


@dataclass
class _Shard:
    pending: collections.OrderedDict[Hashable, PlanJob] = field(default_factory=collections.OrderedDict)
    forget: set[Hashable] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    process: _Process | None = None
    restarts: int = 0


def _unconnected(result: StateDelta | PlanDropped) -> None:
    raise RuntimeError("planner pool is not connected to an engine (Engine.attach_planner)")


class PlannerPool:
    def __init__(
        self,
        spec: WorkerSpec,
        *,
        workers: int = 1,
        max_pending: int = 256,
        max_batch: int = 8,
        hang_factor: float = 4.0,
        hang_grace_s: float = 2.0,
        start_timeout_s: float = 120.0,
        observer: PlannerObserver | None = None,
        target: Callable = worker_main,
    ):
        if workers < 1:
            raise ValueError("a planner pool needs at least one worker")
        self.post: Callable[[StateDelta | PlanDropped], None] = _unconnected
        self.spec = spec
        self.max_pending = max_pending
        self.max_batch = max_batch
        self.hang_factor = hang_factor
        self.hang_grace_s = hang_grace_s
        self.start_timeout_s = start_timeout_s
        self.observer = observer or PlannerObserver()
        self.target = target
        self._n = workers
        self._shards: list[_Shard] = []
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.info: dict = {}

    # Lifecycle (event loop) -----------------------------------------------
    async def start(self) -> None:
        """Start the worker tasks; their processes start in the background (jobs wait meanwhile)."""
        self._loop = asyncio.get_running_loop()
        self._shards = [_Shard() for _ in range(self._n)]
        self._tasks = [asyncio.create_task(self._work(shard), name=f"planner-{i}")
                       for i, shard in enumerate(self._shards)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = [shard.process for shard in self._shards if shard.process is not None]
        await asyncio.gather(*(asyncio.to_thread(process.stop) for process in running))
        for shard in self._shards:
            shard.process = None
        self._tasks = []

    @property
    def ready(self) -> bool:
        return bool(self._shards) and all(s.process is not None for s in self._shards)

    @property
    def pending(self) -> int:
        return sum(len(s.pending) for s in self._shards)

    # The engine's side (engine thread) -------------------------------------
    def connect(self, deliver: Callable[[StateDelta | PlanDropped], None]) -> None:
        """Where results go (the engine's ``post_result``); see :meth:`engine.loop.scheduler.Engine.attach_planner`."""
        self.post = deliver

    def submit(self, job: PlanJob) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._enqueue, job)
                return
            except RuntimeError:  # its event loop is gone
                pass
        self.post(PlanDropped(job.request_id, job.planned_at, "error", "the planner pool is not running"))  # at once

    def discard(self, request_id: Hashable) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._discard, request_id)
        except RuntimeError:  # its event loop is gone
            pass

    judge = staticmethod(judge)  # the final answer's verdict, on the engine thread: the checkers are bounded

    # Queueing (event loop) ---------------------------------------------------
    def _shard(self, request_id: Hashable) -> _Shard:
        return self._shards[hash(request_id) % len(self._shards)]

    def _drop(self, job: PlanJob, outcome: str, detail: str = "") -> None:
        self.observer.on_planner_job(outcome)
        self.post(PlanDropped(job.request_id, job.planned_at, outcome, detail))

    def _enqueue(self, job: PlanJob) -> None:
        shard = self._shard(job.request_id)
        older = shard.pending.pop(job.request_id, None)
        if older is not None:
            self._drop(older, "superseded")
        if self.pending >= self.max_pending:
            fullest = max(self._shards, key=lambda s: len(s.pending))
            _, oldest = fullest.pending.popitem(last=False)
            self._drop(oldest, "overflow")
        shard.pending[job.request_id] = job
        shard.forget.discard(job.request_id)
        shard.wake.set()

    def _discard(self, request_id: Hashable) -> None:
        shard = self._shard(request_id)
        job = shard.pending.pop(request_id, None)
        if job is not None:
            self._drop(job, "discarded")
        shard.forget.add(request_id)

    # Workers (event loop; the search runs in the process) --------------------
    async def _work(self, shard: _Shard) -> None:
        while True:
            if shard.process is None:
                await self._start_process(shard)
            await shard.wake.wait()
            shard.wake.clear()
            while shard.pending and shard.process is not None:
                batch = [shard.pending.popitem(last=False)[1] for _ in range(min(self.max_batch, len(shard.pending)))]
                forget, shard.forget = list(shard.forget), set()
                await self._run(shard, batch, forget)

    async def _start_process(self, shard: _Shard) -> None:
        while shard.process is None:
            try:
                shard.process = await asyncio.to_thread(_Process, self.spec, self.target, self.start_timeout_s)
                self.info = shard.process.info
                log.info("planner worker ready: %s", shard.process.info)
            except WorkerFailed as exc:
                log.error("planner worker failed to start: %s", exc)
                for job in list(shard.pending.values()):
                    self._drop(job, "error", str(exc))
                shard.pending.clear()
                await asyncio.sleep(min(30.0, 1.0 * 2 ** min(shard.restarts, 5)))
                shard.restarts += 1
        if shard.pending:
            shard.wake.set()

    async def _run(self, shard: _Shard, batch: list[PlanJob], forget: list[Hashable]) -> None:
        timeout = max(j.params.time_budget_ms for j in batch) / 1000.0 * self.hang_factor + self.hang_grace_s
        started = time.monotonic()
        process = shard.process
        assert process is not None, "a shard runs jobs only once its worker has started"
        try:
            wire = [job_to_wire(j) for j in batch]
            kind, payload = await asyncio.to_thread(process.call, ("plan", wire, forget), timeout)
        except WorkerFailed as exc:
            log.warning("planner worker replaced: %s", exc)
            shard.process = None
            shard.restarts += 1
            await asyncio.to_thread(process.kill)
            for job in batch:
                self._drop(job, exc.outcome, str(exc))
            await self._start_process(shard)
            return
        if kind != "done":
            for job in batch:
                self._drop(job, "error", str(payload))
            return
        seconds = time.monotonic() - started
        for wire_delta in payload:
            delta = delta_from_wire(wire_delta)
            self.observer.on_planner_job("completed", delta.seconds or seconds, delta.simulations)
            self.post(delta)
