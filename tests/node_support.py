"""Node for tests: the pinned packages of tests/js (the `ai` package, the AsyncAPI parser),
installed by `npm ci` from the lock file once, whichever test worker needs them first."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path

import pytest

JS_DIR = Path(__file__).resolve().parent / "js"


def _installed() -> bool:
    wanted = json.loads((JS_DIR / "package.json").read_text(encoding="utf-8"))["dependencies"]
    return all((JS_DIR / "node_modules" / name / "package.json").exists() for name in wanted)


def install_node_packages() -> Path:
    """tests/js/node_modules, installed by `npm ci` when a package of package.json is missing.
    Test workers are processes: a lock file keeps two of them from installing at once."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for these tests (Node 20 or later)")
    with (JS_DIR / ".npm-install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _installed():
            result = subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    return JS_DIR / "node_modules"
