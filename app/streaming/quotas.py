"""What one API key and one company may hold at once, in this process: WebSocket sockets,
SSE streams and running answers (each running answer holds a model connection); and what
a key may do per minute (messages posted, WebSocket frames), in every process.

A :class:`Quota` counts holders by key id and company id; `acquire` either takes one
unit or says which limit is full, `release` gives it back. Counts live in this process.
The rates are :class:`~app.rate_limit.RateLimit` windows, in Redis when processes share it.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal
from uuid import UUID

from app.config import Settings
from app.rate_limit import LocalWindows, RateLimit, TooManyRequests, Windows

Scope = Literal["key", "company"]
# Seconds a client refused by a quota is asked to wait: these free up as streams end.
QUOTA_RETRY_AFTER = 5


class Quota:
    """At most `per_key` units per API key and `per_company` per company at once."""

    def __init__(self, what: str, per_key: int, per_company: int) -> None:
        self.what = what
        self.per_key = per_key
        self.per_company = per_company
        self._by_key: Counter[UUID] = Counter()
        self._by_company: Counter[UUID] = Counter()

    def acquire(self, key_id: UUID, company_id: UUID) -> Scope | None:
        """Take one unit: None if taken, else the limit that is full (nothing taken)."""
        if self._by_key[key_id] >= self.per_key:
            return "key"
        if self._by_company[company_id] >= self.per_company:
            return "company"
        self._by_key[key_id] += 1
        self._by_company[company_id] += 1
        return None

    def release(self, key_id: UUID, company_id: UUID) -> None:
        """Give back a unit taken by :meth:`acquire` (a key at zero is forgotten)."""
        for counts, holder in ((self._by_key, key_id), (self._by_company, company_id)):
            counts[holder] -= 1
            if counts[holder] <= 0:
                del counts[holder]

    def held(self, *, key_id: UUID | None = None, company_id: UUID | None = None) -> int:
        """Units held by a key, by a company, or (neither given) in all."""
        if key_id is not None:
            return self._by_key[key_id]
        if company_id is not None:
            return self._by_company[company_id]
        return self._by_key.total()

    def refusal(self, scope: Scope, code: str) -> TooManyRequests:
        """The 429 for a refused `acquire`."""
        limit = self.per_key if scope == "key" else self.per_company
        return TooManyRequests(
            f"too many {self.what}: at most {limit} per {'API key' if scope == 'key' else 'company'} at once",
            code=code,
            retry_after=QUOTA_RETRY_AFTER,
            details={"limit": limit, "scope": scope},
        )


class Quotas:
    """Every per-key limit: message and frame rates, sockets, streams, running answers."""

    def __init__(self, settings: Settings | None = None, windows: Windows | None = None) -> None:
        settings = settings or Settings()
        # Where the rates are counted: this process, or Redis (shared by every process).
        windows = windows or LocalWindows()
        self.messages = RateLimit("messages", settings.messages_per_minute, windows)
        self.frames = RateLimit("frames", settings.ws_frames_per_minute, windows)
        self.sockets = Quota(
            "open WebSocket connections", settings.max_sockets_per_key, settings.max_sockets_per_company
        )
        self.streams = Quota("open event streams", settings.max_streams_per_key, settings.max_streams_per_company)
        self.answers = Quota("running answers", settings.max_answers_per_key, settings.max_answers_per_company)
