"""The engine loop and what only it uses: one thread owns the model and runs continuous batching.

- :mod:`engine.loop.scheduler`: :class:`~engine.loop.scheduler.Engine`, the
  loop itself (admit, prefill chunk, decode step, retire), ``submit`` and the
  lifecycle; also importable as ``engine.Engine``;
- :mod:`engine.loop.sequence`: one request in flight and its token counts;
- :mod:`engine.loop.inflight`: where each request sits, the one place that
  knows every container;
- :mod:`engine.loop.batch`: the decode batch, a prefill chunk, per-row sampling;
- :mod:`engine.loop.deliberation` and :mod:`engine.loop.injection`: plans out
  and state deltas in during decoding, and the gated injection that lands them;
- :mod:`engine.loop.writeback`: write-behind of session states to persistent stores.

What callers exchange with the loop lives beside it, public:
:mod:`engine.requests` (requests, handles, events), :mod:`engine.sampling`
(sampling parameters) and :mod:`engine.thinking` (the planner interface).
"""
