"""The layering rules: server -> engine, server -> planner, planner -> engine, nothing back; no training code served.

Checked twice: on the source, where every import statement of every module
is read (module level and inside functions, so a lazy import cannot slip
past the rule), and on what a serving process really loads (``sys.modules``
after building the server and a planner worker), which also sees a module
pulled in through another one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level modules its code must never import
FORBIDDEN = {
    "engine": {"server", "planner", "loadtest", "tests"},
    "planner": {"server", "loadtest", "tests"},
    "server": {"torch", "numpy", "loadtest", "tests", "tqdm", "matplotlib"},
}
# the server must not reach training code either (its libraries live in the 'train' extra)
FORBIDDEN_MODULES = {"server": ("engine.train", "planner.offline"), "planner": ("engine.train", "planner.offline")}
# the offline tools may use what the runtime planner may not (training data and tasks)
ALLOWED_BELOW = {"planner": ("planner/offline/",)}


def imports_of(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_point_one_way(package):
    offending = []
    for path in modules(package):
        if str(path.relative_to(ROOT)).startswith(ALLOWED_BELOW.get(package, ())):
            continue
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in FORBIDDEN[package] or any(name == m or name.startswith(m + ".")
                                                 for m in FORBIDDEN_MODULES.get(package, ())):
                offending.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offending, "\n".join(offending)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from planner.search import search\n    import server.app\n")
    assert imports_of(sample) == ["planner.search", "server.app"]


# What a serving process loads, checked on sys.modules: an import statement the AST walk above allows can still pull
# a forbidden module in through another package (planner.verifiers once loaded engine.train through its tasks).
# (Third-party modules are not checked here: torch.hub itself imports tqdm when it is installed.)
NEVER_LOADED_BY_SERVING = ("engine.train", "planner.offline", "loadtest", "tests")

SERVING_PROCESS = """
import json, sys
from server.cli import build, parse_args
from planner.worker import WorkerSpec, load_planner_for
build(parse_args(["--checkpoint", sys.argv[1], "--planner-workers", "1"]))  # the server, as `make serve` builds it
load_planner_for(WorkerSpec(checkpoint=sys.argv[1]))  # and a planner worker's set-up
print(json.dumps(sorted(sys.modules)))
"""


def test_a_serving_process_loads_no_training_or_offline_code():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SERVING_PROCESS, str(ROOT / "checkpoints" / "default")], cwd=ROOT,
                         capture_output=True, text=True, timeout=240, check=True).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    assert "server.app" in loaded and "planner.planner" in loaded  # it did build the server and the planner
    offending = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in NEVER_LOADED_BY_SERVING)]
    assert not offending, offending
