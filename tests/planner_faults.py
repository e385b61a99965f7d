"""Planner worker processes that fail on purpose (spawn targets for tests/test_planner_pool.py)."""

from __future__ import annotations

import os
import time

import torch

from planner.worker import serve


class _Raises:
    def forget(self, request_id) -> None: ...

    def run(self, jobs):
        raise RuntimeError("search exploded")


def raising_worker(conn, spec) -> None:
    conn.send(("ready", {"simulator": "raises"}))
    serve(conn, _Raises(), torch.float32)


def hanging_worker(conn, spec) -> None:
    conn.send(("ready", {"simulator": "hangs"}))
    conn.recv()
    time.sleep(3600)


def crashing_worker(conn, spec) -> None:
    conn.send(("ready", {"simulator": "crashes"}))
    conn.recv()
    os._exit(3)
