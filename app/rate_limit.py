"""Per-key rate limits (messages posted, WebSocket frames received), and the 429 error.

A :class:`RateLimit` allows at most `per_minute` units per API key in any 60 s (a sliding
window), keyed by the key's id, so that a key's Bearer requests, its cookie sessions and
its sockets share one budget. The window is counted in this process's memory
(:class:`LocalWindows`) or, with several processes (`REDIS_URL`), in Redis
(:class:`RedisWindows`), where every process and node counts against the same budget.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Protocol
from uuid import UUID

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import ApiError

logger = logging.getLogger("chatstream.limits")

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


class Windows(Protocol):
    """Sliding 60 s windows, one per bucket name."""

    async def take(self, bucket: str, limit: int) -> int | None:
        """Count one unit in `bucket` if fewer than `limit` are in its window: None; else
        (nothing counted) the seconds until one leaves it."""
        ...


class LocalWindows:
    """Windows in this process's memory. Memory is bounded: a bucket keeps at most `limit`
    timestamps, and buckets idle for a whole window are dropped."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._taken: dict[str, deque[float]] = {}
        self._last_sweep = clock()

    async def take(self, bucket: str, limit: int) -> int | None:
        now = self._clock()
        if now - self._last_sweep > WINDOW_SECONDS:
            self._sweep(now)
        taken = self._taken.setdefault(bucket, deque())
        while taken and now - taken[0] >= WINDOW_SECONDS:
            taken.popleft()
        if len(taken) >= limit:
            return max(1, math.ceil(WINDOW_SECONDS - (now - taken[0])))
        taken.append(now)
        return None

    def tracked(self) -> int:
        """How many buckets hold timestamps."""
        return len(self._taken)

    def _sweep(self, now: float) -> None:
        self._taken = {name: taken for name, taken in self._taken.items() if taken and now - taken[-1] < WINDOW_SECONDS}
        self._last_sweep = now


# A sorted set per bucket: one member per unit, scored by Redis's clock in ms (one clock for
# every node). Returns -1 when a unit was taken, else the ms until the oldest leaves the window.
_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return math.max(tonumber(oldest[2]) + window - now, 1)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return -1
"""


class RedisWindows:
    """Windows in Redis, shared by every process and node that uses the same Redis and prefix.

    If Redis cannot be reached, units are allowed (the limit is a guard against floods, not
    a gate: what the unit does fails on its own without the broker) and a warning is logged."""

    def __init__(self, redis: Redis, *, prefix: str = "chatstream:") -> None:
        # The broker's command connections: a process holds a fixed number of them.
        self._take = redis.register_script(_TAKE)
        self._prefix = f"{prefix}rate:"
        self._failing = False

    async def take(self, bucket: str, limit: int) -> int | None:
        try:
            wait_ms = await self._take(
                keys=[self._prefix + bucket], args=[limit, int(WINDOW_SECONDS * 1000), uuid.uuid4().hex]
            )
        except (RedisError, OSError) as exc:
            if not self._failing:
                logger.warning("rate limits are not counted: Redis cannot be reached (%s)", type(exc).__name__)
                self._failing = True
            return None
        if self._failing:
            logger.info("rate limits are counted again")
            self._failing = False
        return None if int(wait_ms) < 0 else max(1, math.ceil(int(wait_ms) / 1000))


class RateLimit:
    """At most `per_minute` units of `what` per API key in any 60 s, counted in `windows`."""

    def __init__(self, what: str, per_minute: int, windows: Windows) -> None:
        self.what = what
        self.per_minute = per_minute
        self.windows = windows

    async def take(self, key_id: UUID) -> int | None:
        """Count one unit of `key_id`: None; or, past the limit (nothing counted), the seconds to wait."""
        return await self.windows.take(f"{self.what}:{key_id}", self.per_minute)

    async def check(self, key_id: UUID) -> None:
        """Count one unit of `key_id`, or raise :class:`TooManyRequests` (nothing counted)."""
        retry_after = await self.take(key_id)
        if retry_after is not None:
            raise TooManyRequests(
                f"too many {self.what}: at most {self.per_minute} per minute; retry in {retry_after} s",
                retry_after=retry_after,
                details={"limit": self.per_minute},
            )
