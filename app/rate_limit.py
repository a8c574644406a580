"""Per-key limit on posting messages (each one can start an answer), and the 429 error.

One limiter per process counts the messages of each API key over HTTP and WebSocket
`send` alike, keyed by the key's id, so that a key's Bearer requests and its cookie
sessions share one budget. Limits shared by several processes are issue #18.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from uuid import UUID

from app.errors import ApiError

WINDOW_SECONDS = 60.0


class TooManyRequests(ApiError):
    """429: the caller is over a limit; `retry_after` seconds is when to try again (sent as
    the `Retry-After` header and as `details.retryAfter`)."""

    status = 429
    code = "rate_limited"

    def __init__(
        self, message: str, *, retry_after: int, code: str | None = None, details: dict[str, object] | None = None
    ) -> None:
        super().__init__(message, code=code, details={**(details or {}), "retryAfter": retry_after})
        self.retry_after = retry_after


class MessageLimiter:
    """At most `per_minute` messages per key in any 60 s (a sliding window).

    Memory is bounded: a key keeps at most `per_minute` timestamps, and keys idle for a
    whole window are dropped."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._sent: dict[UUID, deque[float]] = {}
        self._last_sweep = clock()

    def check(self, key_id: UUID) -> None:
        """Count one message of `key_id`, or raise :class:`TooManyRequests` (nothing counted)."""
        now = self._clock()
        if now - self._last_sweep > WINDOW_SECONDS:
            self._sweep(now)
        sent = self._sent.setdefault(key_id, deque())
        while sent and now - sent[0] >= WINDOW_SECONDS:
            sent.popleft()
        if len(sent) >= self.per_minute:
            retry_after = max(1, math.ceil(WINDOW_SECONDS - (now - sent[0])))
            raise TooManyRequests(
                f"too many messages: at most {self.per_minute} per minute; retry in {retry_after} s",
                retry_after=retry_after,
                details={"limit": self.per_minute},
            )
        sent.append(now)

    def tracked_keys(self) -> int:
        """How many keys the limiter holds timestamps for."""
        return len(self._sent)

    def _sweep(self, now: float) -> None:
        self._sent = {key: sent for key, sent in self._sent.items() if sent and now - sent[-1] < WINDOW_SECONDS}
        self._last_sweep = now
