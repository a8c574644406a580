"""docs/asyncapi.json is a valid AsyncAPI document, by the AsyncAPI initiative's own parser
(`@asyncapi/parser`, pinned in tests/js): its schema and its rules, with no error or warning."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from app.streaming.protocol_schema import ASYNCAPI_PATH
from tests.node_support import JS_DIR

# Diagnostic severities of the parser (spectral's): 0 error, 1 warning, 2 information, 3 hint.
WARNING = 1


def test_the_asyncapi_document_is_valid(node_packages: Path) -> None:
    result = subprocess.run(
        ["node", str(JS_DIR / "asyncapi_check.mjs"), str(ASYNCAPI_PATH)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(result.stdout)
    problems = [d for d in report["diagnostics"] if d["severity"] <= WARNING]
    assert report["valid"] and not problems, problems
