"""Where generation logs live and who is reading them.

The core talks to a :class:`Broker`; the in-process one keeps logs in memory for a
single server process. The Redis one (app/streaming/redis_broker.py) fills the same
interface so that several processes share generations.

Conversation events go to the feeds of their conversation and, when published with the
conversation's :class:`~app.streaming.scopes.Scope`, to the conversation lists that may show
the conversation (its owner's and its company's admins'), as list frames
(:func:`~app.streaming.protocol.list_frame`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any, Protocol
from uuid import UUID

from app.streaming.control import ControlMessage
from app.streaming.conversation_log import ConversationLogs
from app.streaming.direct import DirectReader
from app.streaming.events import GenerationEvent
from app.streaming.log import GenerationLog
from app.streaming.protocol import ConversationCreated, ConversationEvent, ListFrame, list_frame
from app.streaming.scopes import Scope


class FeedOverflow(Exception):
    """A subscriber fell so far behind that its feed dropped events (or the broker lost some)."""


class BrokerUnavailable(Exception):
    """The broker's backing service (Redis) cannot be reached; the call did not happen."""


class Feed:
    """One subscriber's feed of rare events: bounded, never waits on the subscriber.

    These events are rare, so a feed that fills up belongs to a subscriber that stopped
    reading; it is marked overflowed and its next read raises :class:`FeedOverflow`.
    """

    def __init__(self, maxsize: int = 256) -> None:
        # A list and a bare future rather than a deque and an asyncio.Event: the events are rare,
        # and those two cost about 1.5 KiB more per open subscription.
        self._events: list[Any] = []
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None  # the subscriber's, while it waits
        self.overflowed = False

    def offer(self, event: Any) -> None:
        """Deliver an event without ever waiting on the subscriber."""
        if len(self._events) >= self._maxsize:
            self.overflowed = True
        else:
            self._events.append(event)
        self._wake()

    def lose(self) -> None:
        """Events may have been missed (the broker lost its connection): the subscriber must
        start over, so its reads raise :class:`FeedOverflow` from now on, a waiting one at once."""
        self.overflowed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next(self) -> Any:
        while True:
            if self.overflowed:
                raise FeedOverflow(repr(self))
            if self._events:
                return self._events.pop(0)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class ConversationFeed(Feed):
    """One subscriber's feed of a conversation's events (messages, edits, renames, new answers)."""

    def __init__(self, conversation_id: UUID, maxsize: int = 256) -> None:
        super().__init__(maxsize)
        self.conversation_id = conversation_id

    def __repr__(self) -> str:
        return f"conversation {self.conversation_id}"

    async def get(self) -> ConversationEvent:
        """The next event; raises :class:`FeedOverflow` once events were dropped."""
        event: ConversationEvent = await self._next()
        return event


class ListFeed(Feed):
    """One subscriber's feed of a conversation list: the conversations of `company_id` owned
    by `owner_id`, or all of them when `owner_id` is None (an admin's list). It holds the
    frames to send (:func:`~app.streaming.protocol.list_frame`), not the conversation events."""

    def __init__(self, company_id: UUID, owner_id: UUID | None, maxsize: int = 256) -> None:
        super().__init__(maxsize)
        self.company_id = company_id
        self.owner_id = owner_id

    def __repr__(self) -> str:
        return f"conversation list of {self.owner_id or 'every owner'} in company {self.company_id}"

    async def get(self) -> ListFrame:
        """The next frame; raises :class:`FeedOverflow` once frames were dropped."""
        frame: ListFrame = await self._next()
        return frame


class ConversationFeeds:
    """The open feeds of one process, by conversation (both brokers keep theirs here)."""

    def __init__(self) -> None:
        self._by_conversation: dict[UUID, set[ConversationFeed]] = {}

    def open(self, conversation_id: UUID) -> ConversationFeed:
        feed = ConversationFeed(conversation_id)
        self._by_conversation.setdefault(conversation_id, set()).add(feed)
        return feed

    def close(self, feed: ConversationFeed) -> None:
        feeds = self._by_conversation.get(feed.conversation_id)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._by_conversation[feed.conversation_id]

    def __contains__(self, conversation_id: UUID) -> bool:
        return conversation_id in self._by_conversation

    def offer(self, event: ConversationEvent) -> None:
        """Hand `event` to every open feed of its conversation (a creation has none: nobody can
        follow a conversation before it exists; lists hear of it)."""
        if isinstance(event, ConversationCreated):
            return
        for feed in list(self._by_conversation.get(event.conversation_id, ())):
            feed.offer(event)

    def lose_all(self) -> None:
        """Every open feed may have missed events (see :meth:`Feed.lose`)."""
        for feeds in self._by_conversation.values():
            for feed in feeds:
                feed.lose()

    def clear(self) -> None:
        self._by_conversation.clear()


class ListFeeds:
    """The open conversation list feeds of one process, by company, then by owner (None: an
    admin's, which lists every owner's conversations)."""

    def __init__(self) -> None:
        self._by_company: dict[UUID, dict[UUID | None, set[ListFeed]]] = {}

    def open(self, company_id: UUID, owner_id: UUID | None) -> ListFeed:
        feed = ListFeed(company_id, owner_id)
        self._by_company.setdefault(company_id, {}).setdefault(owner_id, set()).add(feed)
        return feed

    def close(self, feed: ListFeed) -> None:
        owners = self._by_company.get(feed.company_id)
        feeds = owners.get(feed.owner_id) if owners is not None else None
        if owners is None or feeds is None:
            return
        feeds.discard(feed)
        if not feeds:
            del owners[feed.owner_id]
            if not owners:
                del self._by_company[feed.company_id]

    def wants(self, company_id: UUID) -> bool:
        """True when a list of the company is open here (its events are worth decoding)."""
        return company_id in self._by_company

    def offer(self, event: ConversationEvent, scope: Scope) -> None:
        """Hand what the lists show of `event` to the lists that may show its conversation:
        its owner's and the company's admins'."""
        owners = self._by_company.get(scope.company_id)
        if owners is None:
            return
        frame = list_frame(event)
        if frame is None:
            return
        for owner in (None, scope.owner_id):
            for feed in list(owners.get(owner, ())):
                feed.offer(frame)

    def lose_all(self) -> None:
        for owners in self._by_company.values():
            for feeds in owners.values():
                for feed in feeds:
                    feed.lose()

    def clear(self) -> None:
        self._by_company.clear()


class Broker(Protocol):
    """Event logs of generations, the count of their readers, and conversation feeds.

    Calls that need a backing service raise :class:`BrokerUnavailable` when it is down.
    """

    name: str  # "in-process" or "redis": for logs and the readiness probe
    # True when several processes share the broker (each then runs the heartbeat, the watch
    # for orphaned generations and the control messages).
    shared: bool
    # This process among the producers (stored in `generation.producer`).
    node: str

    def is_peer(self, node: str) -> bool:
        """True when `node` is a process sharing this broker (same Redis and prefix)."""

    async def heartbeat(self) -> None:
        """Tell the other processes this one is alive (for the next few seconds)."""

    async def live_nodes(self, nodes: Collection[str]) -> set[str]:
        """Those of `nodes` whose heartbeat is current."""

    def on_control(self, handler: Callable[[ControlMessage], None]) -> None:
        """Have `handler` called with every control message sent by any process."""

    async def send_control(self, message: ControlMessage) -> None:
        """Send a control message to every process (this one included)."""

    async def open_log(self, generation_id: UUID, conversation_id: UUID) -> None:
        """Create the empty log of a new generation."""

    async def append(self, event: GenerationEvent) -> None:
        """Append to the generation's log and wake its readers. A caller cancelled mid-append
        gets CancelledError only once the append settled (`last_seq` tells if it landed)."""

    async def read(self, generation_id: UUID, after: int, max_wait: float | None) -> list[GenerationEvent] | None:
        """Events after `after`, waiting up to `max_wait` s for one (None: no limit); a `snapshot` first
        when the cursor is older than the retained window, never a silent skip. [] when nothing came
        in time (or the reader has the whole ended log); None when the log is unknown or expired."""

    def park(self, generation_id: UUID, reader: DirectReader, after: int) -> bool:
        """Have the producer's appends write to `reader` itself while it is caught up at
        `after` (app/streaming/direct.py); False when this broker cannot (the reader reads)."""

    def unpark(self, generation_id: UUID, reader: DirectReader) -> None:
        """Undo :meth:`park` (no-op when the reader is no longer parked)."""

    async def close_log(self, generation_id: UUID) -> None:
        """The generation ended: keep its log for the retention time, then drop it."""

    async def discard_log(self, generation_id: UUID) -> None:
        """Drop a log at once (a reserved generation that never started)."""

    async def last_seq(self, generation_id: UUID) -> int | None:
        """Seq of the log's last event (0 when empty); None when the log is unknown or expired."""

    async def add_reader(self, generation_id: UUID) -> int:
        """Count a reader in; returns how many read the generation now."""

    async def remove_reader(self, generation_id: UUID) -> int:
        """Count a reader out; returns how many are left."""

    async def readers(self, generation_id: UUID) -> int:
        """How many read the generation now."""

    async def publish(self, event: ConversationEvent, scope: Scope | None = None) -> None:
        """Number a conversation event (its conversation's next `seq`), keep it in the
        conversation's log, and deliver it to every feed of its conversation and, with the
        conversation's `scope`, what lists show of it to the lists that may show it."""

    async def conversation_since(
        self, conversation_id: UUID, since: int | None
    ) -> tuple[int, list[ConversationEvent] | None]:
        """The conversation's latest event `seq`, and its events after `since` (none asked: []);
        None when some of them are no longer kept or `since` is ahead (the log was lost)."""

    def open_feed(self, conversation_id: UUID) -> ConversationFeed:
        """Start receiving a conversation's events."""

    def close_feed(self, feed: ConversationFeed) -> None:
        """Stop receiving them."""

    def open_list_feed(self, company_id: UUID, owner_id: UUID | None) -> ListFeed:
        """Start receiving the conversation list of `owner_id` in the company (None: of every owner)."""

    def close_list_feed(self, feed: ListFeed) -> None:
        """Stop receiving it."""

    async def ping(self) -> None:
        """Return when the broker works; raise :class:`BrokerUnavailable` when it does not (readiness)."""

    async def close(self) -> None:
        """Release everything (shutdown)."""


class InProcessBroker:
    """Logs in this process's memory: `retain` events per generation, kept `log_ttl` s after the end."""

    name = "in-process"
    shared = False

    def __init__(
        self,
        retain: int = 1000,
        log_ttl: float = 300.0,
        *,
        conversation_retain: int = 100,
        conversation_ttl: float = 3600.0,
    ) -> None:
        self.retain = retain
        self.log_ttl = log_ttl
        self._conversations = ConversationLogs(conversation_retain, conversation_ttl)
        self.node = f"local:{uuid.uuid4().hex}"
        self._control: Callable[[ControlMessage], None] | None = None
        self._logs: dict[UUID, GenerationLog] = {}
        self._readers: Counter[UUID] = Counter()
        self._expiry: dict[UUID, asyncio.TimerHandle] = {}
        self._feeds = ConversationFeeds()
        self._lists = ListFeeds()

    async def open_log(self, generation_id: UUID, conversation_id: UUID) -> None:
        self._logs[generation_id] = GenerationLog(generation_id, conversation_id, retain=self.retain)

    async def append(self, event: GenerationEvent) -> None:
        self._logs[event.generation_id].append(event)

    def log(self, generation_id: UUID) -> GenerationLog | None:
        """The log itself, if this process has it (for tests and diagnostics)."""
        return self._logs.get(generation_id)

    async def read(self, generation_id: UUID, after: int, max_wait: float | None) -> list[GenerationEvent] | None:
        log = self._logs.get(generation_id)
        if log is None:
            return None
        return await log.wait_after(after, max_wait)

    def park(self, generation_id: UUID, reader: DirectReader, after: int) -> bool:
        log = self._logs.get(generation_id)
        return log is not None and log.park(reader, after)

    def unpark(self, generation_id: UUID, reader: DirectReader) -> None:
        log = self._logs.get(generation_id)
        if log is not None:
            log.unpark(reader)

    async def close_log(self, generation_id: UUID) -> None:
        loop = asyncio.get_running_loop()
        self._expiry[generation_id] = loop.call_later(self.log_ttl, self._drop, generation_id)

    async def discard_log(self, generation_id: UUID) -> None:
        self._drop(generation_id)

    async def last_seq(self, generation_id: UUID) -> int | None:
        log = self._logs.get(generation_id)
        return None if log is None else log.last_seq

    def _drop(self, generation_id: UUID) -> None:
        self._logs.pop(generation_id, None)
        self._expiry.pop(generation_id, None)

    async def add_reader(self, generation_id: UUID) -> int:
        self._readers[generation_id] += 1
        return self._readers[generation_id]

    async def remove_reader(self, generation_id: UUID) -> int:
        self._readers[generation_id] -= 1
        left = self._readers[generation_id]
        if left <= 0:
            del self._readers[generation_id]
        return max(left, 0)

    async def readers(self, generation_id: UUID) -> int:
        return self._readers.get(generation_id, 0)

    async def publish(self, event: ConversationEvent, scope: Scope | None = None) -> None:
        event = self._conversations.stamp(event)
        self._feeds.offer(event)
        if scope is not None:
            self._lists.offer(event, scope)

    async def conversation_since(
        self, conversation_id: UUID, since: int | None
    ) -> tuple[int, list[ConversationEvent] | None]:
        return self._conversations.since(conversation_id, since)

    def open_feed(self, conversation_id: UUID) -> ConversationFeed:
        return self._feeds.open(conversation_id)

    def close_feed(self, feed: ConversationFeed) -> None:
        self._feeds.close(feed)

    def open_list_feed(self, company_id: UUID, owner_id: UUID | None) -> ListFeed:
        return self._lists.open(company_id, owner_id)

    def close_list_feed(self, feed: ListFeed) -> None:
        self._lists.close(feed)

    async def ping(self) -> None:
        """Always up: nothing to reach."""

    def is_peer(self, node: str) -> bool:
        return False  # alone: nobody else produces

    async def heartbeat(self) -> None:
        pass

    async def live_nodes(self, nodes: Collection[str]) -> set[str]:
        return {node for node in nodes if node == self.node}

    def on_control(self, handler: Callable[[ControlMessage], None]) -> None:
        self._control = handler

    async def send_control(self, message: ControlMessage) -> None:
        if self._control is not None:
            self._control(message)

    async def close(self) -> None:
        self._feeds.clear()
        self._lists.clear()
        for handle in self._expiry.values():
            handle.cancel()
        self._expiry.clear()
        self._logs.clear()
        self._readers.clear()
