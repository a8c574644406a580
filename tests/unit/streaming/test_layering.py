"""Layering of app/streaming: the core knows nothing about HTTP (only its transports import
Litestar), and nothing about the REST domains (it reaches storage through app/streaming/store.py,
which the chat domain implements)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import app.streaming

TRANSPORTS = {"sse.py", "ws.py", "ai_sdk.py"}
# The domains behind the REST routes: the core must not import them (app/chat imports the core).
DOMAINS = ("app.chat", "app.auth", "app.agents", "app.companies")


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


def test_the_core_does_not_import_the_domains() -> None:
    """No module of app/streaming but its transports imports a domain, directly."""
    package = Path(app.streaming.__file__).parent
    files = [p for p in package.rglob("*.py") if p.name not in TRANSPORTS]
    offenders = {
        str(p.relative_to(package)): sorted(m for m in imported_modules(p) if m.startswith(DOMAINS)) for p in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_core_loads_no_domain() -> None:
    """Nor indirectly: a fresh interpreter importing the core (and its brokers and adapters) has
    loaded no module of a domain."""
    code = (
        "import sys, app.streaming.core, app.streaming.redis_broker;"
        f"print(sorted(m for m in sys.modules if m.startswith({DOMAINS!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
