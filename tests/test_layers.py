"""The layering rules, checked on the source: server -> engine, server -> planner, planner -> engine, nothing back.

Every import statement of every module is read (module level and inside
functions), so a lazy import cannot slip past the rule either.
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
FORBIDDEN_MODULES = {"server": ("engine.train",), "planner": ()}


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
