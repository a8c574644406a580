"""PrincipalCache: hits skip the lookup; revocation, ttl and a session's expiry end an entry."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from app.auth.principal import Principal
from app.auth.principal_cache import PrincipalCache
from app.tables import Role

pytestmark = pytest.mark.anyio


def principal(key_id: uuid.UUID | None = None, session_id: uuid.UUID | None = None, **extra: object) -> Principal:
    return Principal(
        key_id=key_id or uuid.uuid4(),
        user_id=uuid.uuid4(),
        company_id=uuid.uuid4(),
        role=Role.member,
        session_id=session_id,
        **extra,  # type: ignore[arg-type]
    )


class Loader:
    """Counts lookups; returns `result`."""

    def __init__(self, result: Principal | None) -> None:
        self.result = result
        self.calls = 0

    async def __call__(self) -> Principal | None:
        self.calls += 1
        return self.result


async def test_a_second_request_is_served_from_the_cache() -> None:
    cache = PrincipalCache(ttl=60)
    load = Loader(principal())
    assert await cache.resolve("a", load) is load.result
    assert await cache.resolve("a", load) is load.result
    assert load.calls == 1


async def test_unknown_credentials_and_ttl_zero_are_never_cached() -> None:
    refused = Loader(None)
    cache = PrincipalCache(ttl=60)
    assert await cache.resolve("a", refused) is None
    assert await cache.resolve("a", refused) is None
    assert refused.calls == 2
    off = PrincipalCache(ttl=0)
    load = Loader(principal())
    await off.resolve("a", load)
    await off.resolve("a", load)
    assert load.calls == 2


async def test_revoking_a_key_forgets_it_and_its_sessions() -> None:
    key = uuid.uuid4()
    cache = PrincipalCache(ttl=60)
    bearer, session, other = Loader(principal(key)), Loader(principal(key, uuid.uuid4())), Loader(principal())
    for name, load in (("bearer", bearer), ("session", session), ("other", other)):
        await cache.resolve(name, load)
    cache.forget(key)
    for name, load in (("bearer", bearer), ("session", session), ("other", other)):
        await cache.resolve(name, load)
    assert (bearer.calls, session.calls, other.calls) == (2, 2, 1)


async def test_ending_a_session_forgets_only_that_session() -> None:
    key, ended = uuid.uuid4(), uuid.uuid4()
    cache = PrincipalCache(ttl=60)
    bearer, session = Loader(principal(key)), Loader(principal(key, ended))
    await cache.resolve("bearer", bearer)
    await cache.resolve("session", session)
    cache.forget(key, ended)
    await cache.resolve("bearer", bearer)
    await cache.resolve("session", session)
    assert (bearer.calls, session.calls) == (1, 2)


async def test_a_lookup_that_a_revocation_overtook_is_not_stored() -> None:
    cache = PrincipalCache(ttl=60)
    key = uuid.uuid4()
    found = principal(key)

    async def load_while_revoked() -> Principal | None:
        cache.forget(key)  # the revocation lands while the row is being read
        return found

    assert await cache.resolve("a", load_while_revoked) is found
    again = Loader(found)
    await cache.resolve("a", again)
    assert again.calls == 1


async def test_a_session_is_not_cached_past_its_expiry() -> None:
    cache = PrincipalCache(ttl=60)
    load = Loader(principal(session_id=uuid.uuid4(), expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    await cache.resolve("a", load)
    await cache.resolve("a", load)
    assert load.calls == 2


async def test_the_oldest_entry_makes_room() -> None:
    cache = PrincipalCache(ttl=60, max_entries=2)
    loads = {name: Loader(principal()) for name in "abc"}
    for name in "abc":
        await cache.resolve(name, loads[name])
    await cache.resolve("c", loads["c"])
    await cache.resolve("a", loads["a"])
    assert loads["a"].calls == 2 and loads["c"].calls == 1
