"""A child process that serves HTTP on loopback: start it, wait until it answers, always stop it.

The test helpers, the local Prometheus and the dashboard renderer all need
the same three things; a process that exits early fails with its own output.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the process is gone."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def supervised(proc: subprocess.Popen, ready_url: str, timeout: float, name: str,
               output: Callable[[], str] = lambda: "") -> Iterator[subprocess.Popen]:
    """Yield ``proc`` once ``ready_url`` answers 200; terminate it (kill after 10 s) however the block ends."""
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited early:\n{output()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not become ready within {timeout:.0f} s")
            time.sleep(0.1)
        yield proc
    finally:
        stop(proc)
