"""The open sockets and SSE streams of this process, by the credential that opened them.

Revoking a key or ending a session reaches every process as a control message
(`CredentialRevoked`); each process tells the holders of that credential, which close.
A periodic re-check against the database catches what a lost message would miss, and
sessions that expire while a connection is open.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from uuid import UUID

from app.streaming.store import Credential


@dataclass(eq=False)
class _Holder:
    key_id: UUID
    session_id: UUID | None
    on_revoked: Callable[[], None]


class CredentialHolders:
    """Who holds which credential in this process, and telling them it is gone."""

    def __init__(self, invalid: Callable[[set[Credential]], Awaitable[set[Credential]]]) -> None:
        self._invalid = invalid  # which of the given credentials no longer authenticate
        self._by_key: dict[UUID, set[_Holder]] = {}

    @contextmanager
    def holding(self, key_id: UUID, session_id: UUID | None, on_revoked: Callable[[], None]) -> Iterator[None]:
        """While inside, `on_revoked` is called (once, synchronously) if the key is revoked or,
        for a session (`session_id` not None), if the session ends or expires."""
        holder = _Holder(key_id, session_id, on_revoked)
        self._by_key.setdefault(key_id, set()).add(holder)
        try:
            yield
        finally:
            self._forget(holder)

    def _forget(self, holder: _Holder) -> None:
        holders = self._by_key.get(holder.key_id)
        if holders is not None:
            holders.discard(holder)
            if not holders:
                del self._by_key[holder.key_id]

    def revoke(self, key_id: UUID, session_id: UUID | None = None) -> int:
        """Tell the holders of the key (`session_id` None: through any session or none) or of
        that one session; returns how many were told."""
        told = [h for h in self._by_key.get(key_id, ()) if session_id is None or h.session_id == session_id]
        for holder in told:
            self._forget(holder)  # told once: a later message or re-check leaves it alone
            holder.on_revoked()
        return len(told)

    def held(self) -> set[Credential]:
        """Every credential some connection of this process holds."""
        return {(h.key_id, h.session_id) for holders in self._by_key.values() for h in holders}

    async def recheck(self) -> int:
        """Ask the database which held credentials no longer authenticate and tell their
        holders; returns how many holders were told."""
        held = self.held()
        if not held:
            return 0
        # (key, None) is a Bearer key that is revoked or gone: every holder of that key goes.
        gone = await self._invalid(held)
        return sum(self.revoke(key_id, session_id) for key_id, session_id in gone)
