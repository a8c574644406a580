"""The registry of open connections by credential: who is told when a key or a session goes."""

from __future__ import annotations

import uuid

from app.streaming.credentials import CredentialHolders
from app.streaming.store import Credential


async def _none_invalid(held: set[Credential]) -> set[Credential]:
    return set()


def test_a_revoked_key_tells_all_its_holders_a_session_only_its_own_once() -> None:
    """Revoking a key tells every holder of it (Bearer or any session); ending a session
    tells that session's holders only; nobody is told twice; a holder that left is not told."""
    holders = CredentialHolders(_none_invalid)
    key, other_key = uuid.uuid4(), uuid.uuid4()
    session, other_session = uuid.uuid4(), uuid.uuid4()
    told: list[str] = []
    with (
        holders.holding(key, None, lambda: told.append("bearer")),
        holders.holding(key, session, lambda: told.append("session")),
        holders.holding(key, other_session, lambda: told.append("other session")),
        holders.holding(other_key, None, lambda: told.append("other key")),
    ):
        with holders.holding(key, None, lambda: told.append("gone")):
            pass
        assert holders.held() == {(key, None), (key, session), (key, other_session), (other_key, None)}
        assert holders.revoke(key, session) == 1
        assert told == ["session"]
        assert holders.revoke(key) == 2
        assert sorted(told) == ["bearer", "other session", "session"]
        assert holders.revoke(key) == 0 and holders.held() == {(other_key, None)}
    assert holders.held() == set()
    assert told.count("other key") == 0
