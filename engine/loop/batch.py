"""Batches of sequences through the model: the decode batch, a prefill chunk, sampling per row.

The decode batch (:class:`DecodeBatch`) holds row ``i`` for ``seqs[i]``. States live in a persistent buffer that grows to ``max_running`` rows and is
decoded in place (rows ``[0, n)``), so a step allocates no state. A sequence
that leaves takes a copy of its row; the last row moves into the hole, so the
live rows stay contiguous.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from engine.models import MambaLMHeadModel
from engine.sampling import SampleOutput, sample
from engine.state import MambaState

if TYPE_CHECKING:
    from engine.loop.sequence import ActiveSequence


class DecodeBatch:
    def __init__(self, model: MambaLMHeadModel, capacity: int):
        self.model = model
        self.capacity = capacity
        self.seqs: list[ActiveSequence] = []
        self._states: MambaState | None = None

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self) -> Iterator[ActiveSequence]:
        return iter(self.seqs)

    @property
    def _rows(self) -> MambaState:
        """The state buffer, which exists once a sequence has joined (every caller below has a row)."""
        assert self._states is not None, "the decode batch has no rows"
        return self._states

    def join(self, seq: ActiveSequence, state: MambaState) -> int:
        """Add ``seq`` with its batch-1 ``state`` as the last row; returns the row."""
        row = len(self.seqs)
        if self._states is None or self._states.batch_size <= row:
            grown = self.model.allocate_state(max(self.capacity, row + 1))
            if self._states is not None and row > 0:
                grown.write_rows(list(range(row)), self._states.select(list(range(row))))
            self._states = grown
        self._states.write_rows([row], state)
        self.seqs.append(seq)
        return row

    def leave(self, seq: ActiveSequence) -> MambaState:
        """Remove ``seq``; returns a copy of its state."""
        row = self.seqs.index(seq)
        rows = self._rows
        state = rows.select([row])
        last = len(self.seqs) - 1
        if row != last:
            rows.write_rows([row], rows.select([last]))
            self.seqs[row] = self.seqs[last]
        self.seqs.pop()
        return state

    def live(self) -> MambaState:
        """The live rows ``[0, n)`` as views: a decode step writes them in place."""
        n, rows = len(self.seqs), self._rows
        return MambaState(rows.conv[:, :n], rows.ssm[:, :n])

    def copy_row(self, row: int) -> MambaState:
        return self._rows.select([row])

    def ssm_row(self, row: int) -> Tensor:
        """Row ``row``'s SSM state (n_layer, d_inner, d_state), a live view."""
        return self._rows.ssm[:, row]

    def clear(self) -> None:
        """Forget every sequence and the buffer (after a failed step its contents are unknown)."""
        self.seqs.clear()
        self._states = None


def prefill_rows(model: MambaLMHeadModel, chosen: Sequence[tuple[ActiveSequence, int]]) -> Tensor:
    """Feed the next ``n`` prompt tokens of each chosen sequence, as one right-padded batch.

    Each sequence's ``state`` advances (zeros when it had none) and its
    ``to_feed`` shrinks; returns the logits after each row's last fed token.
    """
    ids = torch.zeros(len(chosen), max(n for _, n in chosen), dtype=torch.long)
    for row, (seq, n) in enumerate(chosen):
        ids[row, :n] = torch.tensor(seq.to_feed[:n])
    lengths = torch.tensor([n for _, n in chosen])
    start = MambaState.gather([seq.state if seq.state is not None else model.allocate_state(1) for seq, _ in chosen])
    logits, state = model.prefill(ids, lengths=lengths, state=start)
    for row, (seq, n) in enumerate(chosen):
        seq.state = state.select([row])
        del seq.to_feed[:n]
    return logits


def sample_rows(seqs: Sequence[ActiveSequence], logits: Tensor, vocab: int) -> SampleOutput:
    """One token per sequence, each row with its own sampling parameters, generator and penalty."""
    seen = None
    if any(s.seen is not None for s in seqs):
        seen = torch.stack([s.seen if s.seen is not None else torch.zeros(vocab, dtype=torch.bool) for s in seqs])
    return sample(logits, [s.req.params for s in seqs], [s.generator for s in seqs], seen=seen)
