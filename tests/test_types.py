"""The type gate: mypy over server/, planner/ and engine/ passes (its settings: pyproject.toml, [tool.mypy]).

Run by ``make test`` like any test, so CI fails on a type error; ``make typecheck`` runs mypy alone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_passes_over_the_three_packages():
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "Success: no issues found" in done.stdout
