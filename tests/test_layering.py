"""The packages' imports point one way, as docs/architecture.md draws them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRONT_DOOR = {
    "hierarchical_ap.cli",
    "hierarchical_ap.commands",
    "hierarchical_ap.api",
    "hierarchical_ap.visualize",
}
ALLOWED = {
    # package -> packages it may import (besides itself)
    "hierarchical_ap": set(),
    "intra_op": {"hierarchical_ap"},
    "stage_partitioner": {"hierarchical_ap", "intra_op"},
    "runtime": {"hierarchical_ap", "intra_op"},
}
RUNTIME_INTRA_OP = {"intra_op", "intra_op.apply"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_imports_point_one_way():
    violations = []
    for package, allowed in ALLOWED.items():
        for path in (ROOT / package).rglob("*.py"):
            module = _module_name(path)
            if any(module == f or module.startswith(f + ".") for f in FRONT_DOOR):
                continue  # the front door may import everything
            for imported in _imports(path):
                top = imported.split(".")[0]
                if top in ALLOWED and top != package and top not in allowed:
                    violations.append(f"{module} imports {imported}")
                if package == "runtime" and top == "intra_op" and imported not in RUNTIME_INTRA_OP:
                    violations.append(
                        f"{module} imports {imported} (runtime may use intra_op.apply only)"
                    )
    assert not violations, violations
