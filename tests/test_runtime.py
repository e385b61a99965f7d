"""Thread policy: how many intra-op threads the engine takes, and OpenMP's wait policy set before torch loads."""

from __future__ import annotations

import subprocess
import sys

from engine.runtime import available_cores, engine_threads
from server.cli import configure_openmp
from tests.serving import ROOT


def test_engine_threads_leave_cores_free_for_co_tenants():
    assert engine_threads(planner_threads=0, cores=2) == 1
    assert engine_threads(planner_threads=1, cores=2) == 1
    assert engine_threads(planner_threads=4, cores=2) == 1  # never zero
    assert engine_threads(planner_threads=0, cores=16) == 8
    assert engine_threads(planner_threads=2, cores=16) == 7
    assert 1 <= engine_threads(planner_threads=1) <= available_cores()


def test_configure_openmp_keeps_what_the_user_set():
    env: dict[str, str] = {}
    configure_openmp(env)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    configure_openmp(env)
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_server_entry_sets_the_wait_policy_before_torch_loads(checkpoint):
    """OpenMP (libgomp) prints the settings it read when torch loads (OMP_DISPLAY_ENV): it must read PASSIVE."""
    code = ("import sys\n"
            "import server.cli as cli\n"
            "assert 'torch' not in sys.modules, 'server.cli imports torch before it can set OpenMP up'\n"
            "cli.configure_openmp()\n"
            f"cli.build(cli.parse_args(['--checkpoint', {str(checkpoint)!r}, '--planner-workers', '0']))\n"
            "import torch\n"
            "from engine.runtime import engine_threads\n"
            "assert torch.get_num_threads() == engine_threads(0), torch.get_num_threads()\n")
    env = {"OMP_DISPLAY_ENV": "TRUE", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in done.stderr, done.stderr[-2000:]
