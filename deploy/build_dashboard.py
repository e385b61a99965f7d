"""Write deploy/grafana/dashboards/crsm-serve.json, the Grafana dashboard of CRSM serve.

    python deploy/build_dashboard.py

The panels are declared here as data and the JSON is generated, so every
quantile panel has the same shape and the committed JSON is reviewable as a
diff of this file; tests/test_deploy.py checks that the two agree. Grafana
provisions the JSON on `docker compose up` (deploy/compose.yaml); the same
expressions are evaluated against a live Prometheus in
tests/test_observability.py and plotted by loadtest/dashboard_png.py.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards" / "crsm-serve.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # uid of the provisioned datasource
SEL = '{model_name=~"$model"}'
RATE = "[$__rate_interval]"


def quantiles(metric: str, qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{SEL}{RATE})))", f"p{round(q * 100)}")
            for q in qs]


def rate(metric: str, by: str | None = None) -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({metric}{SEL}{RATE}))"


# (row title, [(panel title, unit, width, [(expr, legend)], threshold or None, description)])
ROWS: list[tuple[str, list[tuple[str, str, int, list[tuple[str, str]], float | None, str]]]] = [
    ("Latency", [
        ("Time to first token", "s", 8, quantiles("crsm_time_to_first_token_seconds"), None,
         "Request arrival to first token, per request."),
        ("Inter-token latency", "s", 8, quantiles("crsm_inter_token_latency_seconds"), None,
         "Time between consecutive tokens of a stream."),
        ("End-to-end latency", "s", 8, quantiles("crsm_e2e_request_latency_seconds"), None,
         "Request arrival to last token."),
    ]),
    ("Throughput and load", [
        ("Tokens/s in and out", "short", 8, [
            (rate("crsm_prompt_tokens_total"), "prompt (in)"),
            (rate("crsm_prefill_tokens_total"), "prefilled (in, not cached)"),
            (rate("crsm_cached_prompt_tokens_total"), "served from cached state"),
            (rate("crsm_generation_tokens_total"), "generated (out)"),
        ], None, "Prompt tokens of finished requests, tokens actually prefilled, and generated tokens."),
        ("Requests running and waiting", "short", 8, [
            (f"sum(crsm_requests_running{SEL})", "running"),
            (f"sum(crsm_requests_waiting{SEL})", "waiting"),
        ], None, "Sequences in the batch, and requests queued for a slot (429 past --max-waiting)."),
        ("Batch size", "short", 8, [
            *quantiles("crsm_batch_size"),
            (f"{rate('crsm_batch_size_sum')} / {rate('crsm_batch_size_count')}", "mean"),
        ], None, "Sequences decoded together per engine step. Quantiles are interpolated inside buckets (a batch of 1 "
         "reads 0.5 at p50); the mean is exact."),
        ("Sessions cached", "short", 6, [(f"sum(crsm_sessions_cached{SEL})", "sessions")], None,
         "Sessions held in the state store."),
        ("Session state bytes", "bytes", 6, [(f"sum(crsm_session_bytes{SEL})", "bytes")], None,
         "Bytes of recurrent state held by sessions (budget: --session-bytes)."),
        ("Prefix cache hit ratio", "percentunit", 6, [
            (f"{rate('crsm_prefix_cache_hits_total')} / {rate('crsm_prefix_cache_queries_total')}", "hits"),
        ], None, "Chat requests whose conversation prefix was found as a cached state."),
        ("Requests finished by reason", "reqps", 6, [(rate("crsm_requests_finished_total", "reason"), "{{reason}}")],
         None, "stop, length, cancelled (client gone) or error."),
    ]),
    ("Errors and SLOs", [
        ("Error responses by status", "reqps", 8, [(rate("crsm_request_errors_total", "status"), "{{status}}")],
         None, "HTTP answers >= 400, by status."),
        ("Failed-request ratio (SLO < 1%)", "percentunit", 8, [
            (f"crsm:error_ratio:rate5m{SEL}", "failed / all (5m)"),
        ], 0.01, "Recording rule crsm:error_ratio:rate5m: 5xx, 429 and engine errors over all requests."),
        ("TTFT p95 (SLO < 1 s)", "s", 8, [
            (f"crsm:time_to_first_token_seconds:p95_5m{SEL}", "TTFT p95 (5m)"),
            (f"crsm:inter_token_latency_seconds:p95_5m{SEL}", "ITL p95 (5m)"),
        ], 1.0, "Recording rules over 5 minutes; the alert fires after 10 minutes above the line."),
    ]),
    ("Planner", [
        ("Planner jobs by outcome", "ops", 8, [(rate("crsm_planner_jobs_total", "outcome"), "{{outcome}}")], None,
         "completed, superseded (a newer job of the session), overflow, discarded, error, timeout."),
        ("Injections by result", "ops", 8, [(rate("crsm_planner_injections_total", "result"), "{{result}}")], None,
         "What became of each state delta in the engine: applied, gated, stale, diverged, rejected."),
        ("Planner simulations/s", "short", 8, [(rate("crsm_planner_simulations_total"), "simulations")], None,
         "MCTS leaf evaluations per second."),
        ("Plan confidence", "short", 6, quantiles("crsm_planner_confidence"), None,
         "Confidence of the deltas the engine received."),
        ("Injection a_eff", "short", 6, quantiles("crsm_planner_injection_alpha"), None,
         "Blend weight of applied deltas: injection_rate * confidence."),
        ("Realised deliberation lag", "short", 6, quantiles("crsm_deliberation_lag_tokens"), None,
         "Tokens between the state a plan read and the step it landed on (quantiles interpolated inside buckets)."),
        ("Planner job seconds", "s", 6, quantiles("crsm_planner_job_seconds"), None,
         "Wall time of one search."),
    ]),
]


def panel(pid: int, title: str, unit: str, x: int, y: int, w: int, targets: list[tuple[str, str]],
          threshold: float | None, description: str) -> dict:
    steps = [{"color": "green", "value": None}]
    if threshold is not None:
        steps.append({"color": "red", "value": threshold})
    return {
        "id": pid, "type": "timeseries", "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": 8},
        "fieldConfig": {"defaults": {
            "unit": unit,
            "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                       "spanNulls": True,
                       "thresholdsStyle": {"mode": "line" if threshold is not None else "off"}},
            "thresholds": {"mode": "absolute", "steps": steps},
        }, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                     "range": True} for i, (expr, legend) in enumerate(targets)],
    }


def build() -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for title, unit, w, targets, threshold, description in row_panels:
            if x + w > 24:
                x, y = 0, y + 8
            panels.append(panel(pid, title, unit, x, y, w, targets, threshold, description))
            pid, x = pid + 1, x + w
        y += 8
    return {
        "uid": "crsm-serve", "title": "CRSM serve", "description": "Latency, throughput, load, errors and the planner.",
        "tags": ["crsm", "llm", "mamba"], "timezone": "browser", "editable": True, "graphTooltip": 1,
        "refresh": "10s", "time": {"from": "now-30m", "to": "now"}, "schemaVersion": 39, "version": 1,
        "templating": {"list": [{
            "name": "model", "label": "model", "type": "query", "datasource": DATASOURCE,
            "query": {"query": "label_values(crsm_requests_running, model_name)", "refId": "model"},
            "definition": "label_values(crsm_requests_running, model_name)",
            "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        }]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
