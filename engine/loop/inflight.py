"""Where the engine's requests sit: the one place that knows every container and moves sequences between them.

A sequence's :class:`~engine.loop.sequence.Phase` says which container holds it:
the inbox (submitted from any thread, guarded by :attr:`InFlight.wake`), the
waiting queue, the prefilling list, the decode batch, or the paused list
(thinking sequences waiting for a plan). Cancellation, failure and shutdown
go through :meth:`InFlight.all` and :meth:`InFlight.detach`, so a new
container cannot be forgotten by one of them.
"""

from __future__ import annotations

import collections
import threading

from engine.loop.batch import DecodeBatch
from engine.loop.sequence import ActiveSequence, Phase
from engine.state import MambaState


class InFlight:
    def __init__(self, batch: DecodeBatch):
        self.wake = threading.Condition()  # guards the inbox; notified when work arrives or the engine stops
        self.inbox: collections.deque[ActiveSequence] = collections.deque()
        self.waiting: collections.deque[ActiveSequence] = collections.deque()
        self.prefilling: list[ActiveSequence] = []
        self.batch = batch
        self.paused: list[ActiveSequence] = []

    @property
    def num_waiting(self) -> int:
        return len(self.inbox) + len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.batch) + len(self.paused)

    def has_work(self) -> bool:
        """Anything for the loop besides the inbox."""
        return bool(self.waiting or self.prefilling or self.batch or self.paused)

    def all(self) -> list[ActiveSequence]:
        """Every sequence held, whatever its phase."""
        with self.wake:
            queued = list(self.inbox)
        return queued + list(self.waiting) + list(self.prefilling) + list(self.batch) + list(self.paused)

    def take_arrivals(self) -> None:
        """Move the inbox to the waiting queue (the caller holds :attr:`wake`)."""
        for seq in self.inbox:
            seq.phase = Phase.WAITING
        self.waiting.extend(self.inbox)
        self.inbox.clear()

    def detach(self, seq: ActiveSequence) -> MambaState | None:
        """Take ``seq`` out of its container; returns its current state (None when it has none yet)."""
        phase, state = seq.phase, seq.state
        if phase is Phase.QUEUED:
            with self.wake:
                self.inbox.remove(seq)
        elif phase is Phase.WAITING:
            self.waiting.remove(seq)
        elif phase is Phase.PREFILLING:
            self.prefilling.remove(seq)
        elif phase is Phase.DECODING:
            state = self.batch.leave(seq)
        elif phase is Phase.PAUSED:
            self.paused.remove(seq)
        seq.state = None
        return state

    def detach_running(self, seq: ActiveSequence) -> MambaState:
        """:meth:`detach` for a sequence past admission (prefilling, decoding or paused): it always has a state."""
        state = self.detach(seq)
        assert state is not None, f"request {seq.handle.id} has no state in phase {seq.phase}"
        return state

    def to_prefill(self, seq: ActiveSequence) -> None:
        seq.phase = Phase.PREFILLING
        self.prefilling.append(seq)

    def to_decode(self, seq: ActiveSequence, state: MambaState) -> int:
        """Join the decode batch with ``state``; returns the row."""
        seq.state, seq.phase = None, Phase.DECODING
        return self.batch.join(seq, state)

    def to_paused(self, seq: ActiveSequence, state: MambaState) -> None:
        seq.state, seq.phase = state, Phase.PAUSED
        self.paused.append(seq)
