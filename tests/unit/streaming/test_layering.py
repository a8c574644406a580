"""The streaming core knows nothing about HTTP: only its transports import Litestar."""

from __future__ import annotations

import ast
from pathlib import Path

import app.streaming

TRANSPORTS = {"sse.py", "ws.py"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_litestar_outside_the_transports() -> None:
    package = Path(app.streaming.__file__).parent
    files = [p for p in package.rglob("*.py") if p.name not in TRANSPORTS]
    assert len(files) >= 6
    offenders = {
        str(p.relative_to(package)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "litestar")
        for p in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}
