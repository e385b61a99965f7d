"""Render the Grafana dashboard to a PNG from a real Prometheus, where Grafana cannot run.

    python -m loadtest.dashboard_png --prometheus http://127.0.0.1:9090 --minutes 15 --out deploy/dashboard.png
    python -m loadtest.dashboard_png --live --out deploy/dashboard.png     # what made the committed PNG

Every panel of deploy/grafana/dashboards/crsm-serve.json is drawn where its
gridPos puts it, from ``query_range`` of its own targets (Grafana variables
substituted), with its legend format and threshold line. ``--live`` starts
the server with one planner worker and a local Prometheus on loopback,
drives loadtest.mixed in phases of 1, 4 and 8 clients, and renders what
Prometheus recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtest.process import free_port, supervised
from loadtest.prometheus import DASHBOARD, local_prometheus, query_range, substitute

ROOT = Path(__file__).resolve().parents[1]
ROW_HEIGHT_IN = 0.32  # inches per grid unit of height
WIDTH_IN = 22.0


def _legend(fmt: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    return text or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"


def _scale(unit: str, peak: float) -> tuple[float, str]:
    """Factor and axis label for a panel unit (Grafana's units, a few of them)."""
    if unit == "s":
        return (1e3, "ms") if peak < 1 else (1.0, "s")
    if unit == "bytes":
        for factor, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if peak >= factor:
                return 1 / factor, name
        return 1.0, "B"
    if unit == "percentunit":
        return 100.0, "%"
    return 1.0, {"reqps": "req/s", "ops": "/s"}.get(unit, "")


def render(prometheus: str, start: float, end: float, out: Path, dashboard: Path = DASHBOARD,
           rate_interval: str = "30s") -> dict[str, int]:
    """Draw the dashboard into ``out``; return the number of series drawn per panel title."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.pyplot as plt

    spec = json.loads(dashboard.read_text())
    panels = spec["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = rows * ROW_HEIGHT_IN + 0.6
    fig = plt.figure(figsize=(WIDTH_IN, height), dpi=80)
    fig.patch.set_facecolor("#111217")
    fig.suptitle(f"{spec['title']}  ({datetime.fromtimestamp(start):%H:%M}-{datetime.fromtimestamp(end):%H:%M}, "
                 "rendered from Prometheus by loadtest/dashboard_png.py)", color="#d8d9da", fontsize=13, y=0.995)
    step = max(1.0, (end - start) / 240)
    drawn: dict[str, int] = {}
    top = 0.6 / height

    def box(g: dict) -> list[float]:
        """Axes rectangle of a panel: its grid cell less room for the tick labels (below) and title (above)."""
        below, above, left_room = 0.38 / height, 0.28 / height, 0.55 / WIDTH_IN
        left = g["x"] / 24 + left_room
        width = g["w"] / 24 - left_room - 0.15 / WIDTH_IN
        bottom = 1 - top - (g["y"] + g["h"]) * ROW_HEIGHT_IN / height + below
        return [left, bottom, width, g["h"] * ROW_HEIGHT_IN / height - below - above]

    for p in panels:
        g = p["gridPos"]
        if p["type"] == "row":
            fig.text(0.005, 1 - top - (g["y"] + 0.8) * ROW_HEIGHT_IN / height, p["title"], color="#d8d9da",
                     fontsize=12, fontweight="bold")
            continue
        drawn[p["title"]] = _draw_panel(fig.add_axes(box(g)), p, prometheus, start, end, step, rate_interval)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=fig.get_facecolor())
    plt.close(fig)
    return drawn


def _draw_panel(ax, p: dict, prometheus: str, start: float, end: float, step: float, rate_interval: str) -> int:
    """Draw one dashboard panel's queries into ``ax``; returns the number of series drawn."""
    from datetime import datetime

    import matplotlib.dates as mdates

    ax.set_facecolor("#181b1f")
    for spine in ax.spines.values():
        spine.set_color("#2c3235")
    ax.tick_params(colors="#9fa7b3", labelsize=8)
    ax.set_title(p["title"], color="#d8d9da", fontsize=10, loc="left")
    defaults = p.get("fieldConfig", {}).get("defaults", {})
    unit = defaults.get("unit", "short")
    lines: list[tuple[str, list, list[float]]] = []
    for t in p["targets"]:
        for series in query_range(prometheus, substitute(t["expr"], rate_interval), start, end, step):
            xs = [datetime.fromtimestamp(float(ts)) for ts, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            lines.append((_legend(t.get("legendFormat", ""), series["metric"]), xs, ys))
    finite = [abs(y) for _, _, ys in lines for y in ys if math.isfinite(y)]
    factor, label = _scale(unit, max(finite, default=0.0))
    for name, xs, ys in lines:
        ax.plot(xs, [y * factor for y in ys], linewidth=1.2, label=name)
    for st in defaults.get("thresholds", {}).get("steps", []):
        if st.get("value") is not None and defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode") == "line":
            ax.axhline(st["value"] * factor, color="#f2495c", linestyle="--", linewidth=1)
    if not lines:
        ax.text(0.5, 0.5, "No data", color="#9fa7b3", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel(label, color="#9fa7b3", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=8))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    ax.grid(color="#2c3235", linewidth=0.5)
    if lines:
        ax.legend(fontsize=7, loc="upper left", ncol=min(4, len(lines)), facecolor="#181b1f",
                  edgecolor="#2c3235", labelcolor="#d8d9da", framealpha=0.8)
    return len(lines)


def live(out: Path, phases: tuple[int, ...], phase_seconds: float, checkpoint: str | None, pause: float = 0.0,
         rate_interval: str = "30s") -> dict[str, int]:
    """Server + local Prometheus on loopback, phased mixed load, then render what was scraped."""
    from loadtest.mixed import run_mixed

    port = free_port()
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port), "--planner-workers", "1",
           "--log-level", "warning", *(["--checkpoint", checkpoint] if checkpoint else [])]
    server = subprocess.Popen(cmd, cwd=ROOT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    with supervised(server, url + "/ready", 120, "server"), tempfile.TemporaryDirectory() as tmp, \
            local_prometheus(Path(tmp), url, free_port(), "2s") as prom:
        start = time.time()
        time.sleep(10)  # an idle stretch first
        for clients in phases:
            seen = asyncio.run(run_mixed(url, concurrency=clients, duration=phase_seconds, seed=clients, pause=pause))
            print(f"{clients} clients: {seen}", file=sys.stderr)
        time.sleep(10)
        return render(prom, start, time.time(), out, rate_interval=rate_interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", help="base URL of a Prometheus that scrapes the server")
    p.add_argument("--minutes", type=float, default=15.0, help="time range to render (with --prometheus)")
    p.add_argument("--live", action="store_true", help="start server + Prometheus here and drive a short load")
    p.add_argument("--phases", default="1,4,8", help="clients of each load phase (with --live)")
    p.add_argument("--phase-seconds", type=float, default=60.0)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between a client's rounds (with --live)")
    p.add_argument("--checkpoint", default=None, help="checkpoint to serve with --live (default: the server's)")
    p.add_argument("--rate-interval", default="30s", help="value of $__rate_interval")
    p.add_argument("--out", type=Path, default=Path("dashboard.png"))
    a = p.parse_args(argv)
    if a.live:
        drawn = live(a.out, tuple(int(x) for x in a.phases.split(",")), a.phase_seconds, a.checkpoint, a.pause,
                    a.rate_interval)
    elif a.prometheus:
        end = time.time()
        drawn = render(a.prometheus, end - a.minutes * 60, end, a.out, rate_interval=a.rate_interval)
    else:
        p.error("give --prometheus URL or --live")
    empty = [title for title, n in drawn.items() if not n]
    print(f"wrote {a.out}" + (f" (no data: {', '.join(empty)})" if empty else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

