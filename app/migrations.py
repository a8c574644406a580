"""Apply the Piccolo migrations from `piccolo_migrations/` (the same ones `piccolo migrations forwards all` runs)."""

from __future__ import annotations

import contextlib
import io

from piccolo.apps.migrations.commands.forwards import run_forwards


class MigrationError(RuntimeError):
    """Migrations could not be applied; the message says why."""


async def apply_migrations(quiet: bool = False) -> str:
    """Run every pending migration. Returns Piccolo's report; raises MigrationError on failure."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out) if quiet else contextlib.nullcontext():
        result = await run_forwards(app_name="all")
    if not result.success:
        raise MigrationError(result.message or "migrations failed")
    return out.getvalue()
