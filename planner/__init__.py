"""The planner (System 2): searches over the engine's state and posts state deltas back.

:mod:`planner.tree` (nodes, PUCT selection, reuse along the generated tokens)
and :mod:`planner.search` (batched search over many requests' trees) run over
a simulator from :mod:`planner.simulators` (the planner's networks, which live
in :mod:`engine.models.planner_net`, or the backbone's own step).
:mod:`planner.verifiers` holds the named checkers a search can use as its
reward where a branch ends the answer. :mod:`planner.planner` turns plan jobs
into state deltas (decision deltas, :mod:`planner.decision`, with a confidence
calibrated offline and read by :mod:`planner.calibration`), :mod:`planner.worker`
runs it in a separate process and :mod:`planner.pool` drives those processes
from asyncio for the server. The offline tools live apart in
:mod:`planner.offline`: the evaluation of planner off against on (``make eval``)
and the gate's calibration; the runtime never loads them. The planner reads state snapshots and never
mutates a sequence: the engine applies the deltas. It imports ``engine``,
never ``server``.
"""
