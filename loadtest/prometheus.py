"""A throwaway local Prometheus pointed at one server, and the dashboard's PromQL.

Used by tests/test_observability.py (evaluate every panel against real
scrapes) and loadtest/dashboard_png.py (plot them). The config is
deploy/prometheus.yml with the target, the intervals and the rule file's path
swapped, so the rules that ship are the rules that get evaluated.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import yaml

from loadtest.process import supervised

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "crsm-serve.json"
RULES = DEPLOY / "rules.yml"

# Names that are Prometheus' own, not the server's.
PROMETHEUS_NAMES = {"up"}
_FUNCTIONS = {"sum", "rate", "histogram_quantile", "round", "vector", "label_values", "by", "on", "and", "or",
              "unless", "irate", "increase", "avg", "max", "min", "count", "without", "ignoring", "le"}


def dashboard_targets(path: Path = DASHBOARD) -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every panel target, rows' children included."""
    out = []

    def walk(panels: list[dict]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"], t.get("legendFormat", "")))
            walk(p.get("panels", []))

    walk(json.loads(path.read_text())["panels"])
    return out


def rule_exprs(path: Path = RULES) -> list[tuple[str, str]]:
    """(record or alert name, expr) of every rule."""
    return [(r.get("record") or r["alert"], r["expr"]) for g in yaml.safe_load(path.read_text())["groups"]
            for r in g["rules"]]


def recording_rule_names(path: Path = RULES) -> set[str]:
    return {r["record"] for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"] if "record" in r}


def substitute(expr: str, rate_interval: str = "1m", model: str = ".*") -> str:
    """Replace the Grafana variables the dashboard uses with concrete values."""
    return (expr.replace("$__rate_interval", rate_interval).replace("${model}", model)
            .replace("$model", model))


def metric_names(expr: str) -> set[str]:
    """Series names an expression reads (label names, functions and keywords left out)."""
    no_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    no_labels = re.sub(r"\{[^}]*\}", "{}", no_strings)
    no_groupings = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", no_labels)
    no_ranges = re.sub(r"\[[^\]]*\]", "[]", no_groupings)
    names = set(re.findall(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:]*\s*\()", no_ranges))
    return {n for n in names if n not in _FUNCTIONS and not re.fullmatch(r"\d.*|e\d+", n)}


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def write_config(folder: Path, server_url: str, interval: str = "1s") -> Path:
    """deploy/prometheus.yml, scraping ``server_url`` every ``interval`` and evaluating the shipped rules."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = interval
    config["global"]["evaluation_interval"] = interval
    config["rule_files"] = [str(RULES)]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "crsm"]
    job["static_configs"] = [{"targets": [urlparse(server_url).netloc]}]
    path = folder / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


@contextmanager
def local_prometheus(folder: Path, server_url: str, port: int, interval: str = "1s", timeout: float = 30.0):
    """Run Prometheus on 127.0.0.1:``port`` scraping ``server_url``; yield its base URL; stop it."""
    binary = prometheus_binary()
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
    config = write_config(folder, server_url, interval)
    log = open(folder / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with supervised(proc, url + "/-/ready", timeout, "prometheus",
                        output=lambda: (folder / "prometheus.log").read_text()):
            yield url
    finally:
        log.close()


def query(url: str, expr: str, at: float | None = None) -> list[dict]:
    """Instant query; the result vector (a PromQL error raises)."""
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    body = httpx.get(url + "/api/v1/query", params=params, timeout=10.0).json()
    if body.get("status") != "success":
        raise ValueError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]


def rule_evaluations(url: str) -> dict[str, str]:
    """The time of the last evaluation of each rule group (RFC 3339 strings, as Prometheus reports them)."""
    body = httpx.get(url + "/api/v1/rules", timeout=10.0).json()
    return {g["name"]: g.get("lastEvaluation", "") for g in body["data"]["groups"]}


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    body = httpx.get(url + "/api/v1/query_range", params={"query": expr, "start": f"{start:.3f}",
                                                          "end": f"{end:.3f}", "step": f"{step:g}"},
                     timeout=30.0).json()
    if body.get("status") != "success":
        raise ValueError(f"{expr}: {body.get('error')}")
    return body["data"]["result"]
