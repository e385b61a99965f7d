"""Process-level settings that the engine's speed depends on.

glibc returns freed memory above ``M_TRIM_THRESHOLD`` to the kernel and
serves allocations above a (dynamic) ``M_MMAP_THRESHOLD`` with fresh
``mmap`` calls, so a decode step that allocates a few 1 MB temporaries pays
for page faults on every step. Measured on the 2-core development VM: a
batch-32 decode step of the d_model=256, 4-layer model went from 7.2 ms to
3.5 ms with the thresholds raised (same effect as the ``GLIBC_TUNABLES``
``glibc.malloc.trim_threshold`` / ``mmap_threshold`` settings).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory(trim_threshold: int = 512 << 20, mmap_threshold: int = 64 << 20) -> bool:
    """Ask glibc to keep freed memory for reuse; a no-op (False) where glibc is absent."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _done = ok
    if not ok:
        log.debug("mallopt refused the thresholds")
    return ok


def set_threads(n: int) -> None:
    """Intra-op threads for torch (0 keeps torch's default)."""
    if n:
        import torch

        torch.set_num_threads(n)


ENGINE_SWITCH_INTERVAL = 0.0005


def share_the_gil_quickly(interval: float = ENGINE_SWITCH_INTERVAL) -> None:
    """Shorten the interpreter's GIL switch interval (5 ms by default) to at most ``interval``.

    The engine thread drops the GIL inside every torch op and must get it
    back to go on; while the event loop (SSE writes, planner results) holds
    it, the engine waits up to a whole switch interval, several decode steps
    of a small model. Measured with thinking streams on the 2-core VM: ITL
    p99 1.8 -> 1.6 ms (off) and 4.1 -> 3.8 ms (on) at 8 streams.
    """
    if sys.getswitchinterval() > interval:
        sys.setswitchinterval(interval)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def engine_threads(planner_threads: int, cores: int | None = None) -> int:
    """The engine's intra-op threads when none were asked for: half the cores the planner workers leave, at least 1.

    Every op of a decode step is a fork-join over these threads, so each op waits for the slowest: when another
    process (a planner worker, another tenant, a build) holds a core one of them needs, the step runs at the
    scheduler's pace. Leaving cores free keeps co-tenants off the engine's threads. On the 2-core VM, under a
    load average of 23-25 from other jobs (``loadtest/bench_contention.py``): one thread kept 0.35-0.80x of its
    quiet tok/s beside a busy loop and never stalled; two passive threads had higher medians but dropped to
    8-96 tok/s in 3 of 12 windows at 8 streams; two spinning threads (torch's default) decoded nothing in most
    2-second windows at 8 streams. ``--threads`` overrides this.
    """
    cores = available_cores() if cores is None else cores
    return max(1, (cores - max(0, planner_threads)) // 2)
