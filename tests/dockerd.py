"""What tests/test_docker.py needs around a real image build: a container daemon, a base image, pip's settings.

- :func:`docker_daemon`: a running daemon is reused; else Debian's ``dockerd`` is started as root with its own
  data root (kept under the user's cache folder, so a rerun reuses the base image and the build cache), its own
  exec root, pidfile and socket (``DOCKER_HOST``), and no bridge, iptables or ip_forward changes: builds and
  containers use the host's network. It is stopped at the end.
- :func:`base_image`: ``python:3.11-slim-bookworm`` when the daemon has it or can pull it; else a stand-in made
  here (debootstrap bookworm minbase + python3, python3-venv, ca-certificates, then ``docker import``), kept in
  the daemon for the next run.
- :class:`PipMirror`: the host's pip settings (``pip config list`` and ``PIP_*``) passed into the build on
  purpose: local find-links folders and ``file://`` indexes (a container cannot read host paths) are served
  over loopback HTTP for a ``--network host`` build; remote URLs pass as they are.
"""

from __future__ import annotations

import http.server
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlparse

import pytest

OFFICIAL_BASE = "python:3.11-slim-bookworm"
LOCAL_BASE = "crsm-local/python:3.11-bookworm"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crsm-serve" / "docker"
MIRROR_PORT = 38517
DEBIAN_MIRROR = os.environ.get("CRSM_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def shout(config: pytest.Config, message: str) -> None:
    """A line on the terminal whatever the output capture (pytest's terminal reporter writes to the real one)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\n*** {message} ***", bold=True, yellow=True)


def cannot_run(config: pytest.Config, reason: str):
    """Skip, loudly: the reason on the terminal, in pytest's warnings summary and as the skip reason."""
    message = f"NO IMAGE BUILD: this machine cannot run a container daemon: {reason}"
    shout(config, message)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


def docker(*args: str, env: dict[str, str], timeout: float = 120, check: bool = True,
           **kwargs) -> subprocess.CompletedProcess:
    """Run the docker CLI; a failure shows its command and output."""
    done = subprocess.run(["docker", *args], check=False, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {shlex.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}"
                             f"\n{done.stderr[-3000:]}")
    return done


def _answers(env: dict[str, str]) -> bool:
    try:
        return docker("info", "--format", "{{.ServerVersion}}", env=env, timeout=20, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def as_root() -> list[str] | None:
    """The prefix that runs a command as root: none for root, ``sudo -n`` where it needs no password, else None."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], check=False, capture_output=True,
                                               timeout=30).returncode == 0:
        return ["sudo", "-n"]
    return None


@contextmanager
def docker_daemon(config: pytest.Config) -> Iterator[dict[str, str]]:
    """Yield the environment under which ``docker`` reaches a daemon (started here if none runs)."""
    if shutil.which("docker") is None:
        cannot_run(config, "no docker CLI on PATH (Debian's docker.io provides it)")
    env = dict(os.environ)
    if _answers(env):
        yield env
        return
    dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/sbin")
    if dockerd is None:
        cannot_run(config, "no daemon answers and there is no dockerd to start (apt-get install docker.io)")
    root = as_root()
    if root is None:
        cannot_run(config, "no daemon answers, dockerd needs root, and this user is not root nor has sudo -n")
    CACHE.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="crsm-dockerd-", dir="/tmp"))  # short: a unix socket path is <108 bytes
    env["DOCKER_HOST"] = f"unix://{run / 'docker.sock'}"
    with open(run / "dockerd.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([*root, dockerd, "--data-root", str(CACHE / "data"), "--exec-root",
                                 str(run / "exec"), "--pidfile", str(CACHE / "dockerd.pid"), "--host",
                                 env["DOCKER_HOST"], "--group", str(os.getgid()), "--bridge", "none",
                                 "--iptables=false", "--ip-forward=false"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _answers(env):
            if proc.poll() is not None or time.monotonic() > deadline:
                what = f"exited {proc.returncode}" if proc.poll() is not None else "did not answer in 60 s"
                cannot_run(config, f"dockerd {what}:\n{(run / 'dockerd.log').read_text()[-1500:]}")
            time.sleep(0.5)
        yield env
    finally:
        proc.terminate()  # sudo passes the signal on
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        # dockerd leaves its network namespace bind-mounted under the exec root: unmount what is left there.
        left = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                if line.split()[1].startswith(str(run) + "/")]
        for mount in reversed(left):
            subprocess.run([*root, "umount", mount], check=False, timeout=60)
        subprocess.run([*root, "rm", "-rf", str(run)], check=False, timeout=60)


def has_image(name: str, env: dict[str, str]) -> bool:
    return docker("image", "inspect", name, env=env, check=False).returncode == 0


def base_image(env: dict[str, str]) -> tuple[str, str]:
    """(image name, where it came from) of the base the build uses."""
    if has_image(OFFICIAL_BASE, env):
        return OFFICIAL_BASE, "present in the daemon"
    if docker("pull", "--quiet", OFFICIAL_BASE, env=env, timeout=300, check=False).returncode == 0:
        return OFFICIAL_BASE, "pulled"
    if has_image(LOCAL_BASE, env):
        return LOCAL_BASE, "debootstrap stand-in, cached in the daemon"
    # debootstrap bookworm minbase: Debian's python3 is 3.11, as in the official image (python3, not python)
    debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    root = as_root()
    assert debootstrap and root is not None, \
        f"{OFFICIAL_BASE} cannot be pulled, and debootstrap (apt-get install debootstrap, run as root) cannot run"
    rootfs = Path(tempfile.mkdtemp(prefix="crsm-rootfs-")) / "rootfs"
    try:
        done = subprocess.run([*root, "nice", "-n", "10", debootstrap, "--variant=minbase",
                               "--include=python3,python3-venv,ca-certificates", "bookworm", str(rootfs),
                               DEBIAN_MIRROR], check=False, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"debootstrap failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        junk = ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "usr/share/doc/*", "usr/share/man/*",
                "usr/share/locale/*", "usr/share/info/*")
        subprocess.run([*root, "sh", "-c", f"cd {rootfs} && rm -rf {' '.join(junk)}"], check=True, timeout=120)
        with subprocess.Popen([*root, "tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            docker("import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', "-", LOCAL_BASE,
                   env=env, timeout=300, stdin=tar.stdout)
            assert tar.wait(timeout=60) == 0
    finally:
        subprocess.run([*root, "rm", "-rf", str(rootfs.parent)], check=False, timeout=120)
    return LOCAL_BASE, "debootstrap stand-in, made now"


class _Mounts(http.server.SimpleHTTPRequestHandler):
    """Serves ``/<n>/...`` from the n-th folder of ``mounts`` (no ``..``), quietly."""

    mounts: ClassVar[list[Path]] = []

    def translate_path(self, path: str) -> str:
        head, _, rest = unquote(urlparse(path).path).lstrip("/").partition("/")
        parts = [p for p in rest.split("/") if p not in ("", ".")]
        if not head.isdigit() or int(head) >= len(self.mounts) or ".." in parts:
            return "/nonexistent"
        return str(self.mounts[int(head)].joinpath(*parts))

    def log_message(self, *args) -> None:
        pass


def pip_settings() -> dict[str, list[str]]:
    """The host's effective pip settings: index-url, extra-index-url, find-links, cert (``PIP_*`` win)."""
    done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], check=False, capture_output=True, text=True,
                          timeout=60)
    names = ("index-url", "extra-index-url", "find-links", "cert")
    found: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.rpartition(".")[2] in names:
            found[key.rpartition(".")[2]] = value.strip().strip("'\"").split()
    for name in names:
        value = os.environ.get("PIP_" + name.replace("-", "_").upper())
        if value:
            found[name] = value.split()
    return found


def pem_certificates(text: str) -> list[str]:
    return re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.DOTALL)


@contextmanager
def pip_mirror(base: str, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Yield the build arguments that give the build the host's pip settings, serving local ones meanwhile.

    A local find-links folder is served as it is; a local index (``file:///x/simple``) with its parent, so that
    relative links to ``../../files`` keep working. CA certificates the host's pip trusts and the base image
    does not (a TLS-inspecting proxy's) go in as ``PIP_CERT_PEM``. TORCH_INDEX_URL is emptied when a served
    location holds a CPU torch wheel, so pip's settings find it.
    """
    settings, mounts, args = pip_settings(), [], {}
    torch_here = False

    def serve(location: str, index: bool) -> str:
        nonlocal torch_here
        parsed = urlparse(location)
        if parsed.scheme not in ("", "file"):
            return location
        folder = Path(unquote(parsed.path))
        torch_here |= any(folder.glob("torch-*+cpu-*.whl")) or any(folder.glob("torch/*+cpu*"))
        mounts.append(folder.parent if index else folder)
        return f"{{url}}/{len(mounts) - 1}/{folder.name + '/' if index else ''}"

    for name, index in (("index-url", True), ("extra-index-url", True), ("find-links", False)):
        located = [serve(v, index) for v in settings.get(name, [])
                   if urlparse(v).scheme not in ("", "file") or Path(unquote(urlparse(v).path)).exists()]
        if located:
            args["PIP_" + name.replace("-", "_").upper()] = " ".join(located)
    for bundle in settings.get("cert", []):
        theirs = set(pem_certificates(docker("run", "--rm", "--network", "none", base, "cat",
                                             "/etc/ssl/certs/ca-certificates.crt", env=env, check=False).stdout))
        extra = [c for c in pem_certificates(Path(bundle).read_text()) if c not in theirs]
        if extra:
            args["PIP_CERT_PEM"] = "\n".join(extra)
    handler = type("Mounts", (_Mounts,), {"mounts": mounts})
    try:  # one port from run to run: the URLs are build arguments, so a new port would miss the build cache
        server = http.server.ThreadingHTTPServer(("127.0.0.1", MIRROR_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="pip-mirror")
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    args = {k: v.replace("{url}", url) for k, v in args.items()}
    if mounts:
        args["PIP_TRUSTED_HOST"] = "127.0.0.1"
    if torch_here:
        args["TORCH_INDEX_URL"] = ""
    try:
        yield args
    finally:
        server.shutdown()
        server.server_close()
