"""deploy/nginx/nginx.conf on loopback: the shipped file with only what differs outside compose rewritten.

The replicas' addresses replace the compose host names, nginx listens on a free loopback port, logs, pid and
temporary files go under a prefix folder, and one worker process makes round robin strictly alternate (each
worker keeps its own position). Used by tests/test_replicas_nginx.py and loadtest/bench_replicas.py.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtest.process import free_port, supervised

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
REPLICA_NAMES = ("crsm-a:8000", "crsm-b:8000")
TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/bin/nginx") if Path(p).exists()), None)


def loopback_conf(replicas: list[str], port: int, prefix: Path) -> str:
    """The shipped configuration for ``replicas`` (``HOST:PORT``, as many as the compose file has; the same one
    twice gives one replica behind nginx) listening on ``127.0.0.1:port``."""
    text = CONF.read_text()
    for name, address in zip(REPLICA_NAMES, replicas, strict=True):
        assert name in text, name
        text = text.replace(name, address)
    temp_paths = "".join(f"    {kind}_temp_path {prefix}/{kind};\n" for kind in TEMP_KINDS)
    swaps = [("listen 8080;", f"listen 127.0.0.1:{port};"), ("worker_processes auto;", "worker_processes 1;"),
             ("access_log /dev/stdout;", f"access_log {prefix}/access.log;\n{temp_paths}")]
    for old, new in swaps:
        assert old in text, old
        text = text.replace(old, new)
    return text


@contextmanager
def running_nginx(replicas: list[str], prefix: Path, timeout: float = 30.0) -> Iterator[str]:
    """A real nginx (``daemon off``, error log and pid file under ``prefix``) on a free loopback port; yields its
    URL once ``/ready`` answers 200 through it; stopped however the block ends."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed")
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(loopback_conf(replicas, port, prefix))
    directives = f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;"
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(prefix), "-g", directives],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    log = prefix / "error.log"
    url = f"http://127.0.0.1:{port}"
    with supervised(proc, url + "/ready", timeout, "nginx", output=lambda: log.read_text() if log.exists() else ""):
        yield url
