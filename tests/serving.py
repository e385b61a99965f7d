"""Helpers for integration tests: a real uvicorn on 127.0.0.1 with a tiny checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import httpx

from engine.checkpoint import save_checkpoint
from engine.text.tokenizer import ByteTokenizer
from loadtest.process import free_port, supervised
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[1]


def tiny_checkpoint(folder: Path) -> Path:
    """A small random byte-level model; deterministic, so greedy outputs can be compared."""
    return save_checkpoint(make_model(seed=11, d_model=32, n_layer=2, vocab_size=ByteTokenizer().vocab_size), folder)


@contextmanager
def running_server(checkpoint: Path | None, *args: str, env: dict | None = None, timeout: float = 60.0):
    """Start ``python -m server`` on a free loopback port (default checkpoint if None); yield its URL; stop it.

    The planner is off unless ``args`` asks for workers (it costs a process per server); requests still in flight
    when the block ends get 2 s of drain (``args`` may set ``--drain-timeout``).
    """
    with running_server_process(checkpoint, *args, env=env, timeout=timeout) as (url, _):
        yield url


@contextmanager
def running_server_process(checkpoint: Path | None, *args: str, env: dict | None = None, timeout: float = 60.0):
    """:func:`running_server`, yielding ``(url, process)``."""
    port = free_port()
    ckpt = ["--checkpoint", str(checkpoint)] if checkpoint is not None else []
    cmd = [sys.executable, "-m", "server", *ckpt, "--host", "127.0.0.1",
           "--port", str(port), "--model-name", "tiny", "--log-level", "warning", "--threads", "1",
           "--planner-workers", "0", "--drain-timeout", "2", *args]  # a test's leftovers end fast on exit
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # Drain the pipe as the server writes: a full pipe buffer (64 KiB of warnings and tracebacks over a module's
    # tests) would block the server's next log call, and every thread waiting on the logging lock with it.
    tail: deque[str] = deque(maxlen=400)
    reader = threading.Thread(target=lambda: tail.extend(proc.stdout), daemon=True, name="server-output")
    reader.start()

    def output() -> str:
        reader.join(timeout=5)  # the process has exited: read to its end
        return "".join(tail)

    url = f"http://127.0.0.1:{port}"
    with supervised(proc, url + "/ready", timeout, "server", output=output):
        yield url, proc


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        raise KeyError(name)
    return total


def complete(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "temperature": 0, "ignore_eos": True, **body},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def token_ids(response: dict) -> list[int]:
    """Generated ids, read from logprobs with return_tokens_as_token_ids."""
    tokens = response["choices"][0]["logprobs"]["tokens"]
    assert all(t.startswith("token_id:") for t in tokens)
    return [int(t.split(":")[1]) for t in tokens]


def ids_request(prompt, n: int, **extra) -> dict:
    return dict(prompt=prompt, max_tokens=n, logprobs=0, return_tokens_as_token_ids=True, **extra)


def sse_events(lines) -> list[tuple[str, str]]:
    """(event name, data) of each server-sent event in ``lines`` (``response.iter_lines()``); comments skipped."""
    out, kind = [], "message"
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            out.append((kind, line[len("data: "):]))
            kind = "message"
    return out
