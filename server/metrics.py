"""Prometheus metrics (names as in DESIGN.md), fed by the HTTP layer and the engine's observer hooks."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.requests import EngineObserver
from planner.pool import PlannerObserver

# ms-scale CPU decoding: buckets start at 1 ms (vLLM's TTFT buckets, extended).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
JOB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0)
UNIT_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
LAG_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

# Label values exported from the start (at zero), so dashboards and alert rules see every series.
PLANNER_JOB_OUTCOMES = ("completed", "superseded", "overflow", "discarded", "error", "timeout")
INJECTION_RESULTS = ("applied", "gated", "stale", "diverged", "rejected")
SLOW_CLIENT_PHASES = ("headers", "body")


class Metrics(EngineObserver, PlannerObserver):
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r = self.registry
        labels = {"model_name": model_name}
        self.ttft = Histogram("crsm_time_to_first_token_seconds", "Time from request arrival to its first token",
                              ["model_name"], buckets=TTFT_BUCKETS, registry=r).labels(**labels)
        self.itl = Histogram("crsm_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             ["model_name"], buckets=ITL_BUCKETS, registry=r).labels(**labels)
        self.e2e = Histogram("crsm_e2e_request_latency_seconds", "Time from request arrival to its last token",
                             ["model_name"], buckets=E2E_BUCKETS, registry=r).labels(**labels)
        self.batch_size = Histogram("crsm_batch_size", "Sequences decoded together in one engine step",
                                    ["model_name"], buckets=BATCH_BUCKETS, registry=r).labels(**labels)
        self.running = Gauge("crsm_requests_running", "Requests prefilling or decoding", ["model_name"],
                             registry=r).labels(**labels)
        self.waiting = Gauge("crsm_requests_waiting", "Requests queued for a batch slot", ["model_name"],
                             registry=r).labels(**labels)
        self.draining = Gauge("crsm_draining", "1 while the server drains on SIGTERM (new requests get 503)",
                              ["model_name"], registry=r).labels(**labels)
        self.prompt_tokens = Counter("crsm_prompt_tokens", "Prompt tokens of finished requests (cached included)",
                                     ["model_name"], registry=r).labels(**labels)
        self.cached_tokens = Counter("crsm_cached_prompt_tokens", "Prompt tokens served from a cached state",
                                     ["model_name"], registry=r).labels(**labels)
        self.prefill_tokens = Counter("crsm_prefill_tokens", "Tokens run through prefill", ["model_name"],
                                      registry=r).labels(**labels)
        self.generation_tokens = Counter("crsm_generation_tokens", "Generated tokens", ["model_name"],
                                         registry=r).labels(**labels)
        self.finished = Counter("crsm_requests_finished", "Finished requests by reason", ["model_name", "reason"],
                                registry=r)
        self.errors = Counter("crsm_request_errors", "Error responses by HTTP status", ["model_name", "status"],
                              registry=r)
        slow = Counter("crsm_slow_clients", "Connections dropped for sending their request too slowly, by phase",
                       ["model_name", "phase"], registry=r)
        self.slow_clients = {p: slow.labels(phase=p, **labels) for p in SLOW_CLIENT_PHASES}
        # Planner (System 2): jobs, search effort, and what became of each delta in the engine.
        jobs = Counter("crsm_planner_jobs", "Planner jobs by outcome", ["model_name", "outcome"], registry=r)
        self.planner_jobs = {o: jobs.labels(outcome=o, **labels) for o in PLANNER_JOB_OUTCOMES}
        self.planner_job_seconds = Histogram("crsm_planner_job_seconds", "Wall time of one planner search",
                                             ["model_name"], buckets=JOB_BUCKETS, registry=r).labels(**labels)
        self.planner_simulations = Counter("crsm_planner_simulations", "MCTS simulations run by the planner",
                                           ["model_name"], registry=r).labels(**labels)
        injections = Counter("crsm_planner_injections", "State deltas by result in the engine",
                             ["model_name", "result"], registry=r)
        self.injections = {res: injections.labels(result=res, **labels) for res in INJECTION_RESULTS}
        self.confidence = Histogram("crsm_planner_confidence", "Confidence of the deltas the engine received",
                                    ["model_name"], buckets=UNIT_BUCKETS, registry=r).labels(**labels)
        self.injection_alpha = Histogram("crsm_planner_injection_alpha", "Blend weight a_eff of applied deltas",
                                         ["model_name"], buckets=UNIT_BUCKETS, registry=r).labels(**labels)
        self.deliberation_lag = Histogram("crsm_deliberation_lag_tokens",
                                          "Tokens between the state a plan read and the step it landed on",
                                          ["model_name"], buckets=LAG_BUCKETS, registry=r).labels(**labels)
        self._labels = labels
        self._store_reader: Callable[[], dict[str, int]] | None = None
        r.register(_StoreCollector(self))

    def bind_store(self, read: Callable[[], dict[str, int]]) -> None:
        """``read()`` returns sessions, session_bytes, session_evictions, prefix_queries, prefix_hits at scrape time."""
        self._store_reader = read

    # Engine hooks (engine thread) -------------------------------------
    def on_step(self, decode_batch: int, prefill_tokens: int, running: int, waiting: int) -> None:
        if decode_batch:
            self.batch_size.observe(decode_batch)
        if prefill_tokens:
            self.prefill_tokens.inc(prefill_tokens)
        self.running.set(running)
        self.waiting.set(waiting)

    def on_finish(self, reason: str) -> None:
        self.finished.labels(reason=reason, **self._labels).inc()

    def on_injection(self, result: str, confidence: float, a_eff: float, realised_lag: int) -> None:
        self.injections[result].inc()
        self.deliberation_lag.observe(realised_lag)
        if result in ("applied", "gated", "rejected"):  # a confidence was read off the plan
            self.confidence.observe(confidence)
        if result == "applied":
            self.injection_alpha.observe(a_eff)

    # Planner pool hooks (event loop) -------------------------------------
    def on_planner_job(self, outcome: str, seconds: float = 0.0, simulations: int = 0) -> None:
        self.planner_jobs[outcome].inc()
        if outcome == "completed":
            self.planner_job_seconds.observe(seconds)
            self.planner_simulations.inc(simulations)

    # HTTP layer ---------------------------------------------------------
    def error(self, status: int) -> None:
        self.errors.labels(status=str(status), **self._labels).inc()

    def slow_client(self, phase: str) -> None:
        """A connection dropped because its request headers or body did not arrive in time."""
        self.slow_clients[phase].inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StoreCollector(Collector):
    """Session and prefix-cache figures, read from the stores when Prometheus scrapes."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def collect(self):
        read = self._metrics._store_reader
        if read is None:
            return
        values = read()
        label = [self._metrics._labels["model_name"]]
        for name, doc, key, family in (
            ("crsm_sessions_cached", "Sessions held in the store", "sessions", GaugeMetricFamily),
            ("crsm_session_bytes", "Bytes held by sessions (states and metadata)", "session_bytes", GaugeMetricFamily),
            ("crsm_session_evictions", "Sessions evicted for the byte budget or the TTL", "session_evictions",
             CounterMetricFamily),
            ("crsm_prefix_cache_queries", "Chat prefix-cache lookups", "prefix_queries", CounterMetricFamily),
            ("crsm_prefix_cache_hits", "Chat prefix-cache lookups that found a state", "prefix_hits",
             CounterMetricFamily),
        ):
            if key not in values:  # the store could not say (Redis unreachable): the rest of the scrape goes on
                continue
            metric = family(name, doc, labels=["model_name"])
            metric.add_metric(label, values[key])
            yield metric
