"""Planner worker processes that fail on purpose (spawn targets for tests/test_planner_pool.py)."""

from __future__ import annotations

import os
import time

from engine.checkpoint import load_model
from planner.worker import serve


class _Raises:
    def forget(self, request_id) -> None: ...

    def run(self, jobs):
        raise RuntimeError("search exploded")


def raising_worker(conn, spec) -> None:
    shape = load_model(spec.checkpoint).model.state_shape()
    conn.send(("ready", {"simulator": "raises"}))
    serve(conn, _Raises(), shape)


def hanging_worker(conn, spec) -> None:
    conn.send(("ready", {"simulator": "hangs"}))
    conn.recv()
    time.sleep(3600)


def crashing_worker(conn, spec) -> None:
    conn.send(("ready", {"simulator": "crashes"}))
    conn.recv()
    os._exit(3)
