"""The per-process counters: quotas per key and per company, and the message limiter."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from app.config import Settings
from app.rate_limit import LocalWindows, RateLimit, TooManyRequests
from app.streaming.quotas import Quota, Quotas


def test_a_quota_refuses_past_the_key_cap_then_past_the_company_cap() -> None:
    quota = Quota("things", per_key=2, per_company=3)
    company, alice, bob = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert quota.acquire(alice, company) is None
    assert quota.acquire(alice, company) is None
    assert quota.acquire(alice, company) == "key"  # refused: nothing taken
    assert quota.held(key_id=alice) == 2 and quota.held(company_id=company) == 2
    assert quota.acquire(bob, company) is None
    assert quota.acquire(bob, company) == "company"
    assert quota.acquire(uuid.uuid4(), uuid.uuid4()) is None  # another company has its own cap
    quota.release(alice, company)
    assert quota.acquire(bob, company) is None  # the company had room again


def test_releasing_everything_leaves_nothing_counted() -> None:
    quota = Quota("things", per_key=5, per_company=5)
    company, key = uuid.uuid4(), uuid.uuid4()
    for _ in range(3):
        assert quota.acquire(key, company) is None
    for _ in range(3):
        quota.release(key, company)
    assert quota.held() == 0 and quota.held(key_id=key) == 0 and quota.held(company_id=company) == 0
    assert not quota._by_key and not quota._by_company  # forgotten, not kept at zero


def test_a_refusal_is_a_429_naming_the_limit() -> None:
    quota = Quota("open event streams", per_key=2, per_company=9)
    error = quota.refusal("company", "too_many_streams")
    assert error.status == 429 and error.code == "too_many_streams"
    assert error.details == {"limit": 9, "scope": "company", "retryAfter": error.retry_after}
    assert error.retry_after >= 1


def test_quotas_come_from_settings() -> None:
    settings = msgspec.structs.replace(
        Settings(), max_sockets_per_key=1, max_streams_per_company=2, max_answers_per_key=3, messages_per_minute=4
    )
    quotas = Quotas(settings)
    assert quotas.sockets.per_key == 1 and quotas.streams.per_company == 2 and quotas.answers.per_key == 3
    assert quotas.messages.per_minute == 4 and quotas.frames.per_minute == settings.ws_frames_per_minute


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.anyio
async def test_the_limiter_is_a_sliding_window_per_key() -> None:
    clock = Clock()
    limiter = RateLimit("messages", 3, LocalWindows(clock=clock))
    alice, bob = uuid.uuid4(), uuid.uuid4()
    for step in range(3):
        clock.now += 10 * step
        await limiter.check(alice)
    # At 1030: three in the last minute (1000, 1010, 1030); the first leaves the window at 1060.
    with pytest.raises(TooManyRequests) as refused:
        await limiter.check(alice)
    assert refused.value.retry_after == 30 and refused.value.details == {"limit": 3, "retryAfter": 30}
    await limiter.check(bob)  # another key has its own budget
    clock.now = 1060.0
    await limiter.check(alice)  # the oldest one has left the window
    with pytest.raises(TooManyRequests):
        await limiter.check(alice)


@pytest.mark.anyio
async def test_limits_of_different_things_count_apart() -> None:
    windows = LocalWindows()
    messages, frames, key = RateLimit("messages", 1, windows), RateLimit("frames", 1, windows), uuid.uuid4()
    assert await messages.take(key) is None and await frames.take(key) is None
    assert await messages.take(key) is not None and await frames.take(key) is not None


@pytest.mark.anyio
async def test_the_windows_forget_idle_keys() -> None:
    clock = Clock()
    windows = LocalWindows(clock=clock)
    limiter = RateLimit("messages", 5, windows)
    for _ in range(100):
        await limiter.check(uuid.uuid4())
    assert windows.tracked() == 100
    clock.now += 61
    await limiter.check(uuid.uuid4())
    assert windows.tracked() == 1
