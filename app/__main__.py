"""`python -m app …` — the same as the `chatstream` console script."""

from app.cli import main

raise SystemExit(main())
