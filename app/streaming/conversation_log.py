"""The latest events of each conversation, numbered, kept in this process's memory (the
in-process broker's; the Redis broker keeps them in Redis, the same way).

Each event published on a conversation gets the conversation's next `conversationSeq` (1, 2, 3 …); the
last `retain` of them stay for `ttl` seconds after the conversation's latest event, so a
client that was away resubscribes with the last one it has (`since`) and gets what it
missed, or learns that it must reload (:meth:`ConversationLogs.since` answers None).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

import msgspec

from app.streaming.protocol import ConversationEvent


@dataclass
class _Log:
    seq: int = 0
    events: deque[ConversationEvent] = field(default_factory=deque)
    touched: float = 0.0


class ConversationLogs:
    """Numbered, bounded logs of conversation events (see the module docstring)."""

    def __init__(self, retain: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.retain = retain
        self.ttl = ttl
        self._clock = clock
        self._logs: dict[UUID, _Log] = {}
        self._last_sweep = clock()

    def stamp(self, event: ConversationEvent) -> ConversationEvent:
        """The event with the conversation's next `conversationSeq`, kept in its log."""
        now = self._clock()
        if now - self._last_sweep > self.ttl:
            self._sweep(now)
        log = self._logs.get(event.conversation_id)
        if log is None:
            log = self._logs[event.conversation_id] = _Log(events=deque(maxlen=self.retain))
        log.seq += 1
        log.touched = now
        stamped = msgspec.structs.replace(event, conversation_seq=log.seq)
        log.events.append(stamped)
        return stamped

    def since(self, conversation_id: UUID, since: int | None) -> tuple[int, list[ConversationEvent] | None]:
        """The conversation's latest `conversationSeq`, and its events after `since` (none asked: []); None
        when some of them are no longer kept, or `since` is ahead of the log (a restart)."""
        log = self._logs.get(conversation_id)
        if log is not None and self._clock() - log.touched > self.ttl:
            del self._logs[conversation_id]
            log = None
        latest = 0 if log is None else log.seq
        if since is None or since == latest:
            return latest, []
        if log is None or since > latest or (log.events and log.events[0].conversation_seq > since + 1):
            return latest, None
        return latest, [event for event in log.events if event.conversation_seq > since]

    def tracked(self) -> int:
        """How many conversations have a log."""
        return len(self._logs)

    def _sweep(self, now: float) -> None:
        self._logs = {cid: log for cid, log in self._logs.items() if now - log.touched <= self.ttl}
        self._last_sweep = now
