"""The floors of the house: services <- target_node, draft_node <- specwire (the command), benchmarks.

A node never imports the other node, nothing imports upwards, and no modules import each other in
a circle. Read from the source (every import, module level or inside a function), then confirmed
by importing every module of each node in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("services", "target_node", "draft_node", "specwire")
# package -> packages of this project it must never import
FORBIDDEN = {
    "services": {"target_node", "draft_node", "specwire", "benchmarks"},
    "target_node": {"draft_node", "specwire", "benchmarks"},
    "draft_node": {"target_node", "specwire", "benchmarks"},
    "specwire": {"benchmarks"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {
        module_name(path): path
        for path in sorted((ROOT / package).rglob("*.py"))
        if "rpc" not in path.relative_to(ROOT).parts  # generated gRPC code
    }


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_runs_to_a_forbidden_floor(package):
    wrong = {
        (name, imported)
        for name, path in modules(package).items()
        for imported in imports(path)
        if imported.split(".")[0] in FORBIDDEN[package]
    }
    assert not wrong, sorted(wrong)


def test_no_import_circle():
    """Imports between the project's modules (inside functions too) form no cycle."""
    every = {name: path for package in PACKAGES for name, path in modules(package).items()}
    graph = {name: {i for i in imports(path) if i in every and i != name} for name, path in every.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("package", ["draft_node", "target_node"])
def test_importing_every_module_of_a_node_loads_nothing_of_the_other(package):
    other = {"draft_node": "target_node", "target_node": "draft_node"}[package]
    names = [name for name in modules(package) if not name.endswith("__main__")]
    probe = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"  # an optional extra (vllm, modal) not installed here
        "        if exc.name and exc.name.split('.')[0] in {'vllm', 'modal', 'triton'}:\n"
        "            continue\n"
        "        raise\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {{{other!r}, 'specwire'}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
