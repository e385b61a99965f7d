"""The image, built and run for real: CI's proof that the Dockerfile works (issue 15).

A daemon (reused, or Debian's dockerd started here), a base image (pulled, or a debootstrap stand-in), the host's
pip settings passed into the build on purpose (tests/dockerd.py says how), then: the CPU image is built from
this checkout; its configuration is checked; a one-line source edit rebuilds only the project's layer; the
container runs read-only as uid 10001, becomes healthy, serves /ready, a streamed chat completion and /metrics;
``docker stop`` during a stream drains: the stream ends with its final event and the server exits 0. Skipped only where no container daemon
can run, and then loudly. Figures (build time, image size, time to healthy, stop time) are printed at the end
and written to the JSON file named by CRSM_DOCKER_RESULTS when set (loadtest/results/docker_build.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.dockerd import base_image, docker, docker_daemon, pip_mirror, shout
from tests.serving import ROOT, free_port, metric_value, sse_events

TAG = "crsm-serve:ci"
EDITED_TAG = "crsm-serve:ci-edited"
BUILDKIT = os.environ.get("CRSM_DOCKER_BUILDKIT", "0")  # 0: the legacy builder, the one every docker has
# `docker stop`'s grace in the stop test: generous, so that what is checked is the drain's behaviour (final event,
# exit 0 by itself), not the machine's speed; the seconds it took are measured against the default 10 s.
STOP_GRACE = 30

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def figures(pytestconfig):
    found: dict = {"builder": "buildkit" if BUILDKIT == "1" else "legacy"}
    yield found
    found["load_average_at_end"] = os.getloadavg()
    shout(pytestconfig, "docker image: " + json.dumps(found))
    if os.environ.get("CRSM_DOCKER_RESULTS"):
        Path(os.environ["CRSM_DOCKER_RESULTS"]).write_text(json.dumps(found, indent=2) + "\n")


@pytest.fixture(scope="module")
def daemon(figures, pytestconfig):
    with docker_daemon(pytestconfig) as env:
        versions = docker("version", "--format", "{{.Client.Version}} {{.Server.Version}}", env=env).stdout.split()
        figures["docker_client"], figures["docker_server"] = versions
        yield env


def build(context: Path, tag: str, args: dict[str, str], env: dict[str, str], log: Path) -> float:
    """``docker build`` with the host's network (the pip mirror listens on loopback); its seconds."""
    flags = [f for k, v in args.items() for f in ("--build-arg", f"{k}={v}")]
    started = time.monotonic()
    with open(log, "w") as out, subprocess.Popen(
            ["nice", "-n", "10", "docker", "build", "--network", "host", "-t", tag, *flags, str(context)],
            env={**env, "DOCKER_BUILDKIT": BUILDKIT}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True) as proc:
        # Each line stamped with the seconds since the start: where the time goes.
        out.writelines(f"{time.monotonic() - started:7.1f} {line}" for line in proc.stdout)
        code = proc.wait(timeout=1200)
    assert code == 0, f"docker build failed ({log}):\n{log.read_text()[-4000:]}"
    return time.monotonic() - started


@pytest.fixture(scope="module")
def image(daemon, figures, tmp_path_factory):
    """The CPU image of this checkout, and the build arguments it was built with (the mirror still serves)."""
    started = time.monotonic()
    base, origin = base_image(daemon)
    figures.update(base_image=base, base_origin=origin, base_seconds=round(time.monotonic() - started, 1))
    with pip_mirror(base, daemon) as pip_args:
        args = {"PYTHON_IMAGE": base, **pip_args}
        figures["build_args"] = sorted(pip_args)
        seconds = build(ROOT, TAG, args, daemon, tmp_path_factory.mktemp("build") / "build.log")
        figures["build_seconds"] = round(seconds, 1)
        figures["image_bytes"] = int(docker("image", "inspect", "-f", "{{.Size}}", TAG, env=daemon).stdout)
        yield args
    docker("image", "rm", "-f", EDITED_TAG, env=daemon, check=False)


def inspect(name: str, env: dict[str, str]) -> dict:
    return json.loads(docker("inspect", name, env=env).stdout)[0]


def test_image_runs_as_a_user_with_a_session_volume_and_no_build_settings(daemon, image, figures):
    config = inspect(TAG, daemon)["Config"]
    assert config["User"] == "10001:10001"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["CRSM_DRAIN_TIMEOUT"] == "8" and env["CRSM_SESSION_STORE"] == "/var/lib/crsm/sessions"
    assert "/var/lib/crsm/sessions" in config["Volumes"]
    assert config["Healthcheck"]["Test"] == ["CMD", "python", "-m", "server.healthcheck"]
    assert config["Healthcheck"]["Interval"] <= 5e9  # seconds after readiness, not 30
    history = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", TAG, env=daemon).stdout
    for name, value in image.items():  # the build's settings stay in the build stages
        if name != "PYTHON_IMAGE":
            assert name not in history and name not in env, name
            assert not value or value not in history, name
    figures["layers"] = [line.split("\t")[0] + " " + line.split("\t")[1][-60:] for line in history.splitlines()
                         if not line.startswith("0B")]


def context_copy(folder: Path) -> Path:
    """What the build context holds (the ``!`` lines of .dockerignore), copied to ``folder``."""
    kept = [line[1:].strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]
    for path in kept:
        source, target = ROOT / path, folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)
    shutil.copy2(ROOT / "Dockerfile", folder / "Dockerfile")
    shutil.copy2(ROOT / ".dockerignore", folder / ".dockerignore")
    return folder


def test_a_source_edit_rebuilds_only_the_project_layer(daemon, image, figures, tmp_path):
    context = context_copy(tmp_path / "context")
    with open(context / "server" / "__init__.py", "a") as f:
        f.write("# a one-line edit\n")
    figures["rebuild_after_edit_seconds"] = round(build(context, EDITED_TAG, image, daemon,
                                                        tmp_path / "build.log"), 1)
    before = inspect(TAG, daemon)["RootFS"]["Layers"]
    after = inspect(EDITED_TAG, daemon)["RootFS"]["Layers"]
    # One layer differs: the project's. Base, user, dependencies and checkpoint are reused (BuildKit adds an empty
    # layer for the last WORKDIR, so the project's is not always the last).
    assert len(after) == len(before) and sum(a != b for a, b in zip(before, after)) == 1
    history = docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", EDITED_TAG, env=daemon)
    figures["project_layer"] = next(line.split("\t")[0] for line in history.stdout.splitlines()
                                    if "/opt/crsm/site" in line)


@pytest.fixture(scope="module")
def container(daemon, image, figures):
    """The image run read-only (a tmpfs /tmp, the sessions volume) on a free loopback port; its URL and name."""
    port, name = free_port(), f"crsm-ci-{os.getpid()}"
    started = time.monotonic()
    docker("run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
           "-e", "CRSM_HOST=127.0.0.1", "-e", f"CRSM_PORT={port}", TAG, env=daemon)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = healthy = None
        while healthy is None:
            state = inspect(name, daemon)["State"]
            assert state["Running"], docker("logs", name, env=daemon, check=False).stderr[-3000:]
            assert time.monotonic() - started < 180, "not healthy after 180 s:\n" + json.dumps(state)
            if ready is None and _status(url + "/ready") == 200:
                ready = time.monotonic() - started
            if state["Health"]["Status"] == "healthy":
                healthy = time.monotonic() - started
            time.sleep(0.25)
        figures.update(seconds_to_ready=round(ready or healthy, 1), seconds_to_healthy=round(healthy, 1))
        yield url, name
    finally:
        docker("rm", "-f", "-v", name, env=daemon, check=False)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_container_serves_a_stream_as_uid_10001(daemon, container):
    url, name = container
    status = docker("exec", name, "cat", "/proc/1/status", env=daemon).stdout
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert set(uids) == {"10001"}  # the server itself, not only the exec'd command
    assert httpx.get(url + "/ready").json()["status"] == "ready"
    body = {"messages": [{"role": "user", "content": "What is a generator?"}], "stream": True, "max_tokens": 16}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r.iter_lines())
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert metric_value(httpx.get(url + "/metrics").text, "crsm_requests_finished_total") >= 1
    # The session store's folder is a volume the server's user can write, even in a read-only container.
    docker("exec", name, "sh", "-c", "touch /var/lib/crsm/sessions/.w && rm /var/lib/crsm/sessions/.w", env=daemon)
    assert any(m["Destination"] == "/var/lib/crsm/sessions" for m in inspect(name, daemon)["Mounts"])


def test_docker_stop_during_a_stream_ends_it_with_its_final_event(daemon, container, figures):
    """Runs last: it stops the container. SIGTERM starts the drain (CRSM_DRAIN_TIMEOUT=8 in the image): the stream
    in flight ends with its final event and [DONE], and the server exits 0 by itself."""
    url, name = container
    body = {"prompt": "def", "max_tokens": 30000, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    first = threading.Event()

    def read() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    first.set()
        except httpx.HTTPError as e:  # the connection cut
            lines.append(f"! {type(e).__name__}")
        first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first.wait(60) and not lines[0].startswith("!"), lines
    started = time.monotonic()
    docker("stop", "-t", str(STOP_GRACE), name, env=daemon, timeout=STOP_GRACE + 60)
    seconds = time.monotonic() - started
    reader.join(30)
    assert not reader.is_alive(), "the stream outlived the container"
    events = sse_events(line for line in lines if not line.startswith("!"))
    exit_code = inspect(name, daemon)["State"]["ExitCode"]
    final = json.loads(events[-2][1])["choices"][0]["finish_reason"] if len(events) > 1 else None
    figures.update(stop_seconds=round(seconds, 2), stop_within_default_grace=seconds < 10, stop_exit_code=exit_code,
                   stop_final_finish_reason=final, stop_streamed_chunks=len(events))
    assert events and events[-1][1] == "[DONE]" and final == "abort", lines[-3:]  # cut by the drain, not the kill
    assert exit_code == 0  # it exited by itself: no SIGKILL (137)
