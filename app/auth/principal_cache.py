"""Recently authenticated credentials, so that a client's next requests skip the key lookup.

A chat client posts a message and opens its stream right after, with the same key: without
this, each request reads the key (and the session) from the database again. An entry lives
`ttl` seconds (never past its session's expiry). A revoked key or an ended session is
forgotten at once on the process that revoked it and, through the broker's control message,
on every other process; `ttl` bounds how long a lost message can keep one usable.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from uuid import UUID

from app.auth.principal import Principal


class PrincipalCache:
    """Principals by token hash, each for at most `ttl` seconds (0: no caching)."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Principal, float]] = {}
        # Bumped by every revocation: a lookup that began before one does not store its result.
        self._epoch = 0

    async def resolve(self, token_hash: str, load: Callable[[], Awaitable[Principal | None]]) -> Principal | None:
        """The cached principal of `token_hash`, else what `load` finds (cached when found)."""
        now = time.monotonic()
        entry = self._entries.get(token_hash)
        if entry is not None:
            if entry[1] > now:
                return entry[0]
            del self._entries[token_hash]
        epoch = self._epoch
        principal = await load()
        if principal is None or self.ttl <= 0 or epoch != self._epoch:
            return principal
        until = now + self.ttl
        if principal.expires_at is not None:
            until = min(until, now + (principal.expires_at.timestamp() - time.time()))
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]  # the oldest entry
        self._entries[token_hash] = (principal, until)
        return principal

    def forget(self, key_id: UUID, session_id: UUID | None = None) -> None:
        """Drop the key's entries (`session_id` None: every session of it too) or that one session's."""
        self._epoch += 1
        gone = [
            token_hash
            for token_hash, (principal, _) in self._entries.items()
            if principal.key_id == key_id and (session_id is None or principal.session_id == session_id)
        ]
        for token_hash in gone:
            del self._entries[token_hash]
