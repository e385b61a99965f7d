"""The dashboard and the SLO rules against the real thing: a live server, scraped by a real Prometheus.

One server with a planner worker serves bounded mixed traffic on loopback
(loadtest.mixed: streams, chat, sessions, thinking, refused requests); a
Prometheus started from deploy/prometheus.yml scrapes it every second and
evaluates deploy/rules.yml. Then every panel target of the Grafana dashboard
is evaluated through Prometheus' HTTP API and must return data.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest

from loadtest.mixed import run_mixed
from loadtest.prometheus import (
    PROMETHEUS_NAMES,
    dashboard_targets,
    local_prometheus,
    metric_names,
    prometheus_binary,
    query,
    recording_rule_names,
    rule_evaluations,
    rule_exprs,
    substitute,
)
from tests.serving import free_port, metric_value, running_server


def exported_series(metrics_text: str) -> set[str]:
    """Every series name /metrics can carry, from its TYPE lines (a labelled family may have no sample yet)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
    names = set()
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name  # TYPE names a counter with or without it
            names |= {base + s for s in suffixes.get(kind, ("",))}
    return names


@pytest.fixture(scope="module")
def server():
    """The default checkpoint with one planner worker, answering plans before the test starts."""
    with running_server(None, "--planner-workers", "1", timeout=120) as url:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # the worker process loads in the background
            with httpx.stream("POST", url + "/think", json={"prompt": "x", "max_tokens": 2, "deliberation_lag": 0},
                              timeout=60) as r:
                events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
            if any(ev.get("outcome") not in (None, "error") for ev in events):
                break
        yield url


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    """A Prometheus scraping ``server`` every second, after a bounded mixed load has been scraped."""
    if prometheus_binary() is None:
        pytest.skip("the prometheus binary is not installed (.ci/run installs Debian's prometheus)")
    with local_prometheus(tmp_path_factory.mktemp("prometheus"), server, free_port(), interval="1s") as prom:
        deadline = time.monotonic() + 30
        while not query(prom, 'up{job="crsm"} == 1'):  # a scrape before the load, so rate() sees it start
            assert time.monotonic() < deadline, "Prometheus did not scrape the server"
            time.sleep(0.5)
        # Several seconds of traffic (several scrapes), bounded by time and by rounds.
        statuses = asyncio.run(run_mixed(server, concurrency=3, rounds=20, duration=8.0, max_tokens=24))
        assert statuses.get(200, 0) > 0 and statuses.get(404, 0) > 0 and statuses.get(400, 0) > 0, statuses
        served = metric_value(httpx.get(server + "/metrics").text, "crsm_generation_tokens_total")
        deadline = time.monotonic() + 30
        while True:  # until a scrape taken after the load is stored, and the rules have seen it
            scraped = query(prom, "sum(crsm_generation_tokens_total)")
            ratio = query(prom, "crsm:error_ratio:rate5m")
            if scraped and float(scraped[0]["value"][1]) >= served and ratio:
                break
            assert time.monotonic() < deadline, f"Prometheus did not scrape the load: {scraped}"
            time.sleep(0.5)
        for _ in range(2):  # two more evaluations of every rule group, so the rules have seen the load
            seen = rule_evaluations(prom)
            while any(rule_evaluations(prom).get(group) == when for group, when in seen.items()):
                assert time.monotonic() < deadline, "Prometheus did not evaluate the rules"
                time.sleep(0.2)
        yield prom


def test_every_dashboard_query_returns_data(prometheus):
    targets = dashboard_targets()
    assert len(targets) >= 30
    empty, no_number = [], []
    for title, expr, _ in targets:
        result = query(prometheus, substitute(expr, rate_interval="1m"))
        values = [float(r["value"][1]) for r in result]
        if not values:
            empty.append((title, expr))
        elif not any(math.isfinite(v) for v in values):
            no_number.append((title, expr, values))
    assert not empty, f"panels whose query returned no series: {empty}"
    assert not no_number, f"panels whose query returned only NaN/Inf: {no_number}"


def test_panels_show_what_the_load_did(prometheus):
    def series(expr: str) -> dict[str, float]:
        return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1])
                for r in query(prometheus, substitute(expr, rate_interval="1m"))}

    by_status = {json.loads(k)["status"]: v for k, v in series(
        'sum by (status) (rate(crsm_request_errors_total{model_name=~"$model"}[$__rate_interval]))').items()}
    assert by_status.get("404", 0) > 0 and by_status.get("400", 0) > 0, by_status
    jobs = {json.loads(k)["outcome"]: v for k, v in series(
        'sum by (outcome) (increase(crsm_planner_jobs_total[5m]))').items()}
    assert jobs["completed"] > 0, jobs
    ttft = series('histogram_quantile(0.5, sum by (le) (rate(crsm_time_to_first_token_seconds_bucket[1m])))')
    assert 0 < next(iter(ttft.values())) < 80


def test_recording_rules_evaluate_and_no_alert_fires(prometheus):
    for name in recording_rule_names():
        result = query(prometheus, name)
        assert result and all(math.isfinite(float(r["value"][1])) for r in result), (name, result)
    (ratio,) = query(prometheus, "crsm:error_ratio:rate5m")
    assert float(ratio["value"][1]) == 0.0  # 400s and 404s are requests, not failures
    groups = httpx.get(prometheus + "/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} == {name for name, _ in rule_exprs()}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    assert [r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"] == []


def test_every_metric_the_dashboard_and_rules_use_is_exported(server):
    used = set()
    for _, expr, _ in dashboard_targets():
        used |= metric_names(expr)
    for _, expr in rule_exprs():
        used |= metric_names(expr)
    used -= recording_rule_names() | PROMETHEUS_NAMES
    assert len(used) >= 20
    text = httpx.get(server + "/metrics").text
    missing = used - exported_series(text)
    assert not missing, f"used by the dashboard or rules but not in /metrics: {sorted(missing)}"



def test_dashboard_png_renders_every_panel_with_data(prometheus, tmp_path):
    """loadtest.dashboard_png (what drew deploy/dashboard.png) plots every panel from query_range."""
    from loadtest.dashboard_png import render

    out = tmp_path / "dashboard.png"
    end = time.time()
    drawn = render(prometheus, end - 60, end, out, rate_interval="20s")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(drawn) == len({title for title, _, _ in dashboard_targets()})
    assert [title for title, n in drawn.items() if n == 0] == []
