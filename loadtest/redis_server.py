"""A real redis-server on a free loopback port, for the tests and benchmarks of the Redis session store.

No persistence (``--save ''``, ``--appendonly no``), its working directory a
temporary one; stopped (killed after 5 s) however the block ends.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from loadtest.process import free_port, stop


@contextmanager
def running_redis(timeout: float = 10.0) -> Iterator[str]:
    """Yield ``redis://127.0.0.1:PORT/0`` once the server answers PING."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="crsm-redis-") as workdir:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url, socket_timeout=1.0)
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited early with code {proc.returncode}")
                try:
                    client.ping()
                    break
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not answer within {timeout:.0f} s") from None
                    time.sleep(0.05)
            client.close()
            yield url
        finally:
            stop(proc, timeout=5)
