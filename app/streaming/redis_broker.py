"""The Redis broker: generation logs, reader counts and conversation feeds shared by every
server process that uses the same Redis and key prefix.

Key layout (P = the prefix, g = a generation id; the `{g}` hash tag keeps a generation's
keys in one cluster slot, so that one script may touch them all):

- ``P gen:{g}:log`` — stream: the generation's events, entry id ``0-<seq>``, field ``e`` =
  the event as JSON; only the last `retain` entries are kept (``XADD … MAXLEN retain``).
- ``P gen:{g}:meta`` — hash: ``conv`` (conversation id), ``last`` (seq of the last event),
  ``tseq`` (seq of the last event the text covers), ``closed`` (1 once a terminal event is in).
- ``P gen:{g}:text`` — string: the answer's text so far (every token APPENDed), for `snapshot`s.
- ``P gen:{g}:parts`` — string: the answer's part events (`part.start`, `part.delta`, `part.end`),
  one line each, ``<byte length of text when it came> <event JSON>``: with the text, a
  `snapshot`'s parts (app/streaming/events.py `fold`). Plain-text answers never create it.
- ``P gen:{g}:readers`` — hash: broker id -> how many of that process's readers read `g`.
- ``P conv:<c>`` — pub/sub channel of conversation `c`'s events; ``P conv:<company>:<owner>:<c>``
  for the events published with the conversation's scope (its company and owner), which
  conversation lists show too. Every process reads both through the one pattern
  subscription; a process that reads only the last segment (before lists existed) still
  finds the conversation.
- ``P wake:<broker id>`` — stream that wakes this broker's reading loop (see `_wake_reader`).
- ``P node:<broker id>`` — a process's heartbeat, kept NODE_TTL seconds (the core renews it).
- ``P control`` — pub/sub channel of control messages between processes (app/streaming/control.py).

Expiry: a generation's keys get ORPHAN_TTL at open, pushed back by every append (a producer
that dies leaves nothing forever); :meth:`RedisBroker.close_log` sets `log_ttl` on all of them.

Commands: the commands of every task of the process that come in the same turn of the event
loop go to Redis together, as one pipeline (:meth:`RedisBroker._execute`).

Connections per process do not depend on the number of readers: `pool_size` for commands,
one for the reading loop (a single blocking ``XREAD`` over every stream a local reader waits
on), one for heartbeats and one for the pub/sub loop (one pattern subscription for every
conversation, which also carries the conversation lists, and the control channel). Waiting
readers hold an asyncio event, never a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, get_args
from uuid import UUID

import msgspec
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, KeyT

from app import metrics
from app.streaming.broker import BrokerUnavailable, ConversationFeed, ConversationFeeds, ListFeed, ListFeeds
from app.streaming.control import ControlMessage, control_decoder, control_encoder
from app.streaming.direct import DirectReader, deliver_to
from app.streaming.events import (
    GenerationEvent,
    PartDelta,
    PartEnd,
    PartStart,
    Snapshot,
    Token,
    fold,
    is_terminal,
    json_decoder,
    json_encoder,
)
from app.streaming.parts import AnswerParts, text_of
from app.streaming.protocol import ConversationEvent
from app.streaming.scopes import Scope
from app.streaming.wakeup import Wakeup

logger = logging.getLogger("chatstream.streaming.redis")

# A log whose producer died without closing it is dropped this long after its last event:
# longer than any pause inside an answer (every append pushes it back), short enough that
# the logs of crashed processes do not pile up. Never shorter than `log_ttl`.
ORPHAN_TTL = 6 * 3600.0
# A Redis that takes longer than this to accept a connection or answer a command counts as
# down: calls raise BrokerUnavailable instead of hanging (every command here is O(retain) at worst).
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0
# The reading loop's XREAD BLOCK. It only bounds how long a silently dead connection can go
# unnoticed: the loop is woken at once when it must follow a new stream.
BLOCK_MS = 5_000
# The reading loop's pause between two XREADs: each names every watched stream (its cost grows with
# them), so under load one XREAD every 2 ms that brings what came meanwhile costs less than one per
# event; a token waits at most this much longer.
READ_PAUSE = 0.002
_XREAD = (b"XREAD", b"BLOCK", b"%d" % BLOCK_MS, b"STREAMS")
# Reconnection backoff of the background loops (the first retry after a working period is immediate).
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
# A process whose heartbeat is older than this is taken for dead: the other processes end the
# generations it was producing. Renewed several times within it (core.HEARTBEAT_INTERVAL).
NODE_TTL = 3.0
# A watch outlives its last waiter this long: a reader that follows an answer is back
# within a moment, and then reads what the reading loop brought, with no command of its own
# (no read script, no wake-up, no restart of the XREAD).
WATCH_LINGER = 5.0

# Conversation events travel as `<origin broker id> <struct name> <seq> <JSON>` (the JSON without
# its seq, which the publish script gives it); the name picks the decoder, one per struct, made once.
_CONVERSATION_DECODERS: dict[str, msgspec.json.Decoder[Any]] = {
    cls.__name__: msgspec.json.Decoder(cls) for cls in get_args(ConversationEvent)
}

# A conversation's numbered events (docs/protocol.md, `since`): KEYS: its seq counter, its log (a
# stream whose ids are `0-<seq>`). ARGV: channel, origin broker id, struct name, JSON, retain, ttl
# ms. Numbers the event, keeps it (the log trimmed to `retain`, both keys expiring `ttl`
# after the conversation's latest event), publishes it; returns its seq.
_PUBLISH_CONVERSATION = """
local seq = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], '0-' .. seq, 'k', ARGV[3], 'b', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. seq .. ' ' .. ARGV[4])
return seq
"""

# KEYS: as above. ARGV: since (-1: none). Returns {latest seq, 'ok' or 'reset', then struct name
# and JSON of each event after `since`}: 'reset' when some are no longer kept or `since` is ahead.
_CONVERSATION_SINCE = """
local latest = tonumber(redis.call('GET', KEYS[1]) or '0')
local since = tonumber(ARGV[1])
if since < 0 or since == latest then return {latest, 'ok'} end
if since > latest then return {latest, 'reset'} end
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #first == 0 or tonumber(string.match(first[1][1], '%d+$')) > since + 1 then return {latest, 'reset'} end
local reply = {latest, 'ok'}
for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '0-' .. (since + 1), '+')) do
  table.insert(reply, string.match(entry[1], '%d+$'))
  table.insert(reply, entry[2][2])
  table.insert(reply, entry[2][4])
end
return reply
"""

# KEYS: meta, log, text, parts, readers. ARGV: seq, event JSON, token text ('' for other events),
# terminal (1/0), retain, ttl ms, part event (1/0). The expiry of the generation's keys is pushed
# back every 64 events (not at every token: that was the largest part of Redis's cost per token),
# and set on the text and parts keys when their first append creates them.
_APPEND = """
local meta = redis.call('HMGET', KEYS[1], 'last', 'closed')
local last = meta[1]
if not last then return redis.error_reply('UNKNOWN no such generation log') end
if meta[2] == '1' then return redis.error_reply('ENDED the generation ended') end
if tonumber(ARGV[1]) > tonumber(last) + 1 then return redis.error_reply('ORDER a seq is missing') end
-- The explicit id makes Redis itself refuse a duplicated or reordered event (seq <= last).
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[5], '0-' .. ARGV[1], 'e', ARGV[2])
if redis.call('APPEND', KEYS[3], ARGV[3]) == string.len(ARGV[3]) and ARGV[3] ~= '' then
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
if ARGV[7] == '1' then
  local line = redis.call('STRLEN', KEYS[3]) .. ' ' .. ARGV[2] .. '\\n'
  if redis.call('APPEND', KEYS[4], line) == string.len(line) then redis.call('PEXPIRE', KEYS[4], ARGV[6]) end
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'last', ARGV[1], 'closed', '1')
else
  redis.call('HSET', KEYS[1], 'last', ARGV[1], 'tseq', ARGV[1])
end
if tonumber(ARGV[1]) % 64 == 1 then
  for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
end
return 1
"""

# KEYS: meta, log, text, parts. ARGV: after. Returns nil for an unknown log, else
# {last, closed, snapshot seq (-1: none), snapshot text, conversation id, snapshot part events, event JSON...}.
_READ = """
local m = redis.call('HMGET', KEYS[1], 'last', 'tseq', 'closed', 'conv')
if not m[1] then return false end
local out = {tonumber(m[1]), tonumber(m[3]), -1, '', '', ''}
if tonumber(ARGV[1]) >= out[1] then return out end
local entries = redis.call('XRANGE', KEYS[2], '(0-' .. ARGV[1], '+')
if entries[1] == nil or entries[1][1] ~= '0-' .. (tonumber(ARGV[1]) + 1) then
  -- The cursor is in a gap (trimmed or lost entries): the answer so far, then what follows it.
  out[3], out[4], out[5] = tonumber(m[2]), redis.call('GET', KEYS[3]) or '', m[4]
  out[6] = redis.call('GET', KEYS[4]) or ''
  entries = redis.call('XRANGE', KEYS[2], '(0-' .. m[2], '+')
end
for _, entry in ipairs(entries) do out[#out + 1] = entry[2][2] end
return out
"""

# KEYS: readers, meta. ARGV: broker id, +1/-1, ttl ms when the log is gone. Returns the total.
# The counts live as long as the log (PTTL of meta) and a process's count never goes below 0.
_COUNT = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
local total = 0
for _, n in ipairs(redis.call('HVALS', KEYS[1])) do total = total + tonumber(n) end
if total > 0 then
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl <= 0 then ttl = tonumber(ARGV[3]) end
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return total
"""


def _resp(*args: bytes) -> bytes:
    """A command as Redis reads it (RESP), for bytes arguments: what redis-py's pack_command
    makes, at a quarter of its cost (an XREAD has two arguments per stream read)."""
    return b"*%d\r\n" % len(args) + b"".join([b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args])


def _append_error(event: GenerationEvent, error: Exception) -> Exception:
    """The exception an append raises, from what Redis answered to its script."""
    if not isinstance(error, ResponseError):
        return error
    reason = str(error)
    if reason.startswith("UNKNOWN"):
        return KeyError(event.generation_id)
    if reason.startswith("ENDED"):
        return RuntimeError(f"generation {event.generation_id} already ended")
    if reason.startswith("ORDER") or "equal or smaller" in reason:
        return ValueError(f"event seq {event.seq} does not follow the log's last event")
    return error


def _answer_from(text: bytes, part_events: bytes) -> AnswerParts:
    """The answer's parts from its text and its part events (each with the text's byte length
    when it came): the text between two part events is the text they were interleaved with."""
    answer = AnswerParts()
    at = 0
    for line in part_events.splitlines():
        offset, _, raw = line.partition(b" ")
        upto = int(offset)
        if upto > at:
            answer.add_text(text[at:upto].decode())
            at = upto
        fold(answer, json_decoder.decode(raw))
    if len(text) > at:
        answer.add_text(text[at:].decode())
    return answer


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    """Redis being unreachable, as the broker's own exception (callers need not know redis-py)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        metrics.broker_error("command")
        raise BrokerUnavailable(f"Redis is not reachable: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _Command:
    """One Redis command for the next pipeline: its arguments, or a script's keys and arguments."""

    args: tuple[EncodableT, ...]
    script: AsyncScript | None = None
    keys: tuple[KeyT, ...] = ()


@dataclass(eq=False)
class _Watch:
    """This process's readers waiting on one generation, and what the reading loop last read of it."""

    generation_id: UUID
    key: bytes  # the generation's log (stream) key
    pos: int  # seq up to which the reading loop has read the stream
    waiters: int = 0
    closed: bool = False  # the reading loop has seen the terminal event
    idle_since: float = 0.0  # when its last waiter returned (it lingers WATCH_LINGER s)
    batch: list[GenerationEvent] = field(default_factory=list)
    batch_from: int | None = None  # `batch` is every event after this seq; None: it follows a gap
    error: BrokerUnavailable | None = None
    # Bumped when a whole XREAD block passed with nothing read: waiters then look at the log
    # themselves (it may have expired unseen: an XREAD on a key that is gone waits for ever).
    checks: int = 0
    wakeup: Wakeup = field(default_factory=Wakeup)  # its waiting readers, woken by what the loop reads
    # Readers caught up with `pos`, written to by the loop itself (app/streaming/direct.py).
    parked: list[DirectReader] = field(default_factory=list)
    # One timer for every waiter's idle wait (a timer per wait was a large part of a token's cost).
    idle_timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        self.wakeup.wake()

    def wake_by(self, deadline: float) -> None:
        """Make sure the waiters are woken by `deadline` (loop time), new events or not."""
        if self.idle_timer is not None:
            if self.idle_timer.when() <= deadline:
                return
            self.idle_timer.cancel()
        self.idle_timer = asyncio.get_running_loop().call_at(deadline, self._idle)

    def _idle(self) -> None:
        self.idle_timer = None
        self.wake()

    def deliver(self, batch: list[GenerationEvent], follows: bool) -> None:
        """Write what the loop read to the parked readers, in order; after a gap (`follows`
        false) each of them reads for itself (a snapshot may be due)."""
        if not follows:
            self.hand_back()
            return
        for event in batch:
            if not self.parked:
                return
            self.parked = deliver_to(self.parked, event)

    def hand_back(self) -> None:
        """Every parked reader's task runs again, and reads for itself."""
        parked, self.parked = self.parked, []
        for reader in parked:
            reader.hand_back()

    def drop(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None


class RedisBroker:
    """Generation logs in Redis Streams, reader counts in Redis hashes, conversation feeds over
    Redis pub/sub: what one process appends, every process reads (same `url` and `prefix`).

    Same semantics as :class:`~app.streaming.broker.InProcessBroker`: `retain` events per
    generation plus the answer's text, kept `log_ttl` seconds after :meth:`close_log`.
    `pool_size` bounds the connections used for commands; the process holds at most
    `pool_size + 3` connections whatever the number of readers.
    """

    name = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "chatstream:",
        retain: int = 1000,
        log_ttl: float = 300.0,
        pool_size: int = 16,
        conversation_retain: int = 100,
        conversation_ttl: float = 3600.0,
    ) -> None:
        if retain < 1:
            raise ValueError("retain must be at least 1")
        self.prefix = prefix
        self.retain = retain
        self.log_ttl = log_ttl
        self.conversation_retain = conversation_retain
        self.conversation_ttl_ms = int(conversation_ttl * 1000)
        # This broker's (this process's) id: its field in reader counts, part of its connections' names.
        self.id = uuid.uuid4().hex
        self._ttl_ms = max(int(log_ttl * 1000), 0)
        self._orphan_ms = int(max(log_ttl, ORPHAN_TTL) * 1000)
        common: dict[str, Any] = {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_keepalive": True}
        # Commands: a bounded pool. One quick retry, so that a pooled connection that was dropped
        # is simply reopened; not after a timeout, when the commands may have run (a reader
        # counted twice, an event appended twice).
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=COMMAND_TIMEOUT,
            client_name=self.client_name("commands"),
            socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1, supported_errors=(RedisConnectionError,)),
            **common,
        )
        self._redis = Redis(connection_pool=self._pool)
        # The loops' own connections, without retries: the loops handle errors (and reconnect) themselves.
        # The reading loop bounds its XREAD itself (see _xread), hence no socket timeout here
        # (redis-py's default is 5 s).
        self._reader = Redis.from_url(
            url,
            single_connection_client=True,
            client_name=self.client_name("reader"),
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),
            **common,
        )
        # Heartbeats on a connection of their own: a process whose command pool is busy (under
        # load) must not look dead to the others.
        self._heartbeat_redis = Redis.from_url(
            url,
            single_connection_client=True,
            client_name=self.client_name("heartbeat"),
            socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 1),
            **common,
        )
        self._feeds_redis = Redis.from_url(
            url,
            max_connections=1,
            client_name=self.client_name("feeds"),
            socket_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            **common,
        )
        self._append_script = self._redis.register_script(_APPEND)
        self._read_script = self._redis.register_script(_READ)
        self._count_script = self._redis.register_script(_COUNT)
        self._publish_script = self._redis.register_script(_PUBLISH_CONVERSATION)
        self._since_script = self._redis.register_script(_CONVERSATION_SINCE)
        self._watches: dict[UUID, _Watch] = {}
        self._parked_on: dict[DirectReader, _Watch] = {}  # parked readers, and the watch of each
        # The keys an append names, per generation appended to here (dropped when its log is closed).
        self._append_keys: dict[UUID, tuple[str, ...]] = {}
        # Commands waiting for the next pipeline, and the pipelines under way (one connection each:
        # at most `pool_size - 1`, one connection is left for ping and close).
        self._queued: list[tuple[list[_Command], asyncio.Future[list[Any]]]] = []
        self._flush_pending = False
        self._flushes: set[asyncio.Task[None]] = set()
        self._max_flushes = max(pool_size - 1, 1)
        self.round_trips = 0  # pipelines sent (diagnostics, benchmarks)
        self._wake_key = f"{prefix}wake:{self.id}"
        self._wake_id = b"0-0"
        self._reading: asyncio.Task[None] | None = None
        self._feeds = ConversationFeeds()
        self._lists = ListFeeds()
        self._conversation_channels = f"{prefix}conv:"
        self._feeding: asyncio.Task[None] | None = None
        self._feeds_down = False
        self._counted: Counter[UUID] = Counter()  # this process's readers, to count out at close
        self._closed = False
        self.node = f"{prefix}{self.id}"
        self._control_channel = f"{prefix}control"
        self._control: Callable[[ControlMessage], None] | None = None

    @property
    def commands(self) -> Redis:
        """The client of the broker's command pool (for other small shared state: rate limits)."""
        return self._redis

    def client_name(self, role: str) -> str:
        """The name (CLIENT SETNAME) of this broker's connections for `role`: commands, reader, feeds."""
        return f"{self.prefix}{self.id}:{role}"

    def _keys(self, generation_id: UUID) -> list[str]:
        base = f"{self.prefix}gen:{{{generation_id}}}"
        return [f"{base}:meta", f"{base}:log", f"{base}:text", f"{base}:parts"]

    def _readers_key(self, generation_id: UUID) -> str:
        return f"{self.prefix}gen:{{{generation_id}}}:readers"

    # -- logs ----------------------------------------------------------------------------

    async def open_log(self, generation_id: UUID, conversation_id: UUID) -> None:
        """Create the empty log of a new generation (it expires on its own if never appended to or closed)."""
        meta, log, text, parts = self._keys(generation_id)
        # Not a transaction: no other process knows the generation's id yet.
        await self._execute(
            _Command(("DEL", meta, log, text, parts)),
            _Command(("HSET", meta, "conv", str(conversation_id), "last", 0, "tseq", 0, "closed", 0)),
            _Command(("PEXPIRE", meta, self._orphan_ms)),
        )

    async def append(self, event: GenerationEvent) -> None:
        """Append to the generation's log (its readers in every process wake up).

        A caller cancelled mid-append gets CancelledError only once Redis has answered:
        :meth:`last_seq` then tells whether the event is in the log.

        Raises ValueError when the seq does not follow the last one (Redis refuses a duplicate),
        RuntimeError after the terminal event, KeyError for an unknown log."""
        keys = self._append_keys.get(event.generation_id)
        if keys is None:  # made once per answer, not per token
            keys = self._append_keys[event.generation_id] = (
                *self._keys(event.generation_id),
                self._readers_key(event.generation_id),
            )
        done = self._submit(_Command(self._append_args(event), self._append_script, keys))
        try:
            with contextlib.suppress(Exception):  # _check raises it, translated
                await asyncio.shield(done)
        except asyncio.CancelledError:
            await asyncio.wait([done])  # it is sent anyway: let it settle
            raise
        try:
            self._check(done)
        except ResponseError as exc:
            raise _append_error(event, exc) from exc

    def _submit(self, *commands: _Command) -> asyncio.Future[list[Any]]:
        """Queue `commands` for the next pipeline; the future gets their replies."""
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queued.append((list(commands), done))
        self._schedule_flush()
        return done

    @staticmethod
    def _check(done: asyncio.Future[list[Any]]) -> list[Any]:
        """The replies of a settled :meth:`_submit`, or the first error among them (BrokerUnavailable
        when Redis could not be reached)."""
        with _unavailable():
            replies = done.result()
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies

    async def _execute(self, *commands: _Command) -> list[Any]:
        """Run `commands` (in this order, nothing of this process between them) and return their
        replies; raise the first error a command got, as BrokerUnavailable when Redis is unreachable.

        Every command of every task of this process that comes in the same turn of the event
        loop goes to Redis in one pipeline: one write and one read. With a pooled connection
        and a round trip each, commands queued for seconds for a connection on a busy loop,
        and that looked like an outage."""
        done = self._submit(*commands)
        with contextlib.suppress(Exception):  # _check raises it, translated
            await done
        return self._check(done)

    def _schedule_flush(self) -> None:
        """Start a pipeline for what is queued, unless one is about to start or too many are under way."""
        if self._closed:
            batch, self._queued = self._queued, []
            for _, done in batch:
                if not done.done():
                    done.set_exception(BrokerUnavailable("the broker was closed"))
            return
        if self._flush_pending or len(self._flushes) >= self._max_flushes or not self._queued:
            return  # the pending pipeline takes them, or the next one once a pipeline is back
        self._flush_pending = True
        task = asyncio.create_task(self._flush())
        self._flushes.add(task)
        task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._schedule_flush()

    async def _flush(self) -> None:
        """Send what is queued as one pipeline; hand each caller its replies (or the pipeline's error)."""
        try:
            await asyncio.sleep(0)  # let the other tasks of this turn queue theirs
        finally:
            self._flush_pending = False
        batch, self._queued = self._queued, []
        commands = [command for group, _ in batch for command in group]
        replies: list[Any] = []
        error: Exception = BrokerUnavailable("the broker was closed")
        try:
            replies = await self._send(commands)
            # Scripts are loaded when Redis first lacks them (first use, or Redis restarted):
            # redis-py's own way costs a SCRIPT EXISTS round trip per pipeline.
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                await self._retry_without_script(commands, missing, replies)
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
            error = exc
        finally:  # also when cancelled (at close): no caller is left waiting
            at = 0
            for group, done in batch:
                if not done.done():  # else its caller was cancelled
                    if len(replies) >= at + len(group):
                        done.set_result(replies[at : at + len(group)])
                    else:
                        done.set_exception(error)
                at += len(group)

    async def _retry_without_script(self, commands: list[_Command], missing: list[int], replies: list[Any]) -> None:
        """Load the scripts Redis lacked and send their commands again (a NOSCRIPT command did not run)."""
        try:
            for script in {commands[i].script for i in missing}:
                if script is not None:
                    await self._redis.script_load(script.script)
            retried = await self._send([commands[i] for i in missing])
        except (RedisError, OSError) as exc:
            retried = [exc] * len(missing)
        for i, reply in zip(missing, retried, strict=True):
            replies[i] = reply

    async def _send(self, commands: list[_Command]) -> list[Any]:
        """One pipeline: the replies of `commands`, an error reply as its exception."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for command in commands:
                if command.script is None:
                    pipe.execute_command(*command.args)
                else:
                    pipe.execute_command("EVALSHA", command.script.sha, len(command.keys), *command.keys, *command.args)
            self.round_trips += 1
            return await pipe.execute(raise_on_error=False)

    def _append_args(self, event: GenerationEvent) -> tuple[EncodableT, ...]:
        text = event.text if isinstance(event, Token) else ""
        part = int(isinstance(event, (PartStart, PartDelta, PartEnd)))
        encoded = json_encoder.encode(event)
        return (event.seq, encoded, text, int(is_terminal(event)), self.retain, self._orphan_ms, part)

    async def _read_now(self, generation_id: UUID, after: int) -> tuple[list[GenerationEvent], int, bool] | None:
        """(events after `after`, last seq, closed) in one round trip; None for an unknown log."""
        [reply] = await self._execute(_Command((after,), self._read_script, tuple(self._keys(generation_id))))
        if reply is None:
            return None
        last, closed, snapshot_seq, text, conversation, part_events = reply[:6]
        events: list[GenerationEvent] = [json_decoder.decode(raw) for raw in reply[6:]]
        if snapshot_seq >= 0:
            parts = _answer_from(text, part_events).copy()
            snapshot = Snapshot(
                generation_id=generation_id,
                conversation_id=UUID(conversation.decode()),
                seq=snapshot_seq,
                text=text_of(parts),
                parts=parts,
            )
            events.insert(0, snapshot)
        return events, last, bool(closed)

    async def read(self, generation_id: UUID, after: int, max_wait: float | None) -> list[GenerationEvent] | None:
        """Events after `after`, waiting up to `max_wait` s for one (None: no limit). A cursor older
        than the retained window gets a `snapshot` first. [] when nothing came in time (or the reader
        has the whole ended log); None when the log is unknown or expired."""
        watch = self._watches.get(generation_id)
        if watch is not None and watch.pos > after and watch.batch_from is not None and watch.batch_from <= after:
            return [event for event in watch.batch if event.seq > after]  # what the loop brought
        last = watch.pos if watch is not None else 0
        if watch is None or watch.pos != after:
            state = await self._read_now(generation_id, after)
            if state is None:
                return None
            events, last, closed = state
            if events or closed or (max_wait is not None and max_wait <= 0):
                return events
        elif watch.closed or (max_wait is not None and max_wait <= 0):
            return []  # the reader has everything the reading loop read, up to the end
        loop = asyncio.get_running_loop()
        deadline = None if max_wait is None else loop.time() + max_wait
        watch = self._watches.get(generation_id)
        new = watch is None
        if watch is None:
            watch = self._watches[generation_id] = _Watch(generation_id, self._keys(generation_id)[1].encode(), last)
        watch.waiters += 1
        try:
            self._start_reading()
            if new:
                await self._wake_reader()
            return await self._wait(generation_id, watch, after, deadline)
        finally:
            watch.waiters -= 1
            if watch.waiters == 0:
                watch.idle_since = loop.time()  # dropped by the reading loop if nobody comes back

    async def _wait(
        self, generation_id: UUID, watch: _Watch, after: int, deadline: float | None
    ) -> list[GenerationEvent] | None:
        loop = asyncio.get_running_loop()
        checked = watch.checks
        while True:
            if watch.error is not None:
                raise BrokerUnavailable(str(watch.error))
            if watch.checks != checked and watch.pos <= after:
                checked = watch.checks
                state = await self._read_now(generation_id, after)
                if state is None:
                    return None  # the log expired while this reader waited: the caller reads the store
                if state[0] or state[2]:
                    return state[0]
            if watch.pos > after:
                if watch.batch_from is not None and watch.batch_from <= after:
                    # What the reading loop brought covers this reader: no command of its own.
                    return [event for event in watch.batch if event.seq > after]
                # Woken late (the batch moved on) or after a gap: read it all, snapshot included.
                state = await self._read_now(generation_id, after)
                if state is None:
                    return None
                events, _, closed = state
                if events or closed:
                    return events
            if deadline is not None:
                if deadline <= loop.time():
                    return []
                watch.wake_by(deadline)  # may end the wait sooner (another waiter's deadline), never later
            await watch.wakeup.wait()
            if watch.checks != checked:
                continue  # look at the log first (above)
            if deadline is not None and watch.pos <= after and watch.error is None:
                return []  # woken by the idle timer: nothing new for this reader

    def park(self, generation_id: UUID, reader: DirectReader, after: int) -> bool:
        # Parked on the generation's watch: the reading loop writes what it reads (a reader
        # that has not read through a watch yet, or is behind it, reads as before).
        watch = self._watches.get(generation_id)
        if watch is None or watch.closed or watch.error is not None or watch.pos != after:
            return False
        reader.seq = after
        watch.parked.append(reader)
        watch.waiters += 1  # keeps the watch read
        self._parked_on[reader] = watch
        return True

    def unpark(self, generation_id: UUID, reader: DirectReader) -> None:
        watch = self._parked_on.pop(reader, None)
        if watch is None:
            return
        if reader in watch.parked:
            watch.parked.remove(reader)
        watch.waiters -= 1
        if watch.waiters == 0:
            watch.idle_since = asyncio.get_running_loop().time()

    async def close_log(self, generation_id: UUID) -> None:
        """The generation ended: every key of it expires `log_ttl` seconds from now."""
        self._append_keys.pop(generation_id, None)
        keys = [*self._keys(generation_id), self._readers_key(generation_id)]
        await self._execute(*(_Command(("PEXPIRE", key, self._ttl_ms)) for key in keys))

    async def discard_log(self, generation_id: UUID) -> None:
        """Drop a log at once (a reserved generation that never started)."""
        self._append_keys.pop(generation_id, None)
        await self._execute(_Command(("UNLINK", *self._keys(generation_id))))

    async def last_seq(self, generation_id: UUID) -> int | None:
        """Seq of the log's last event (0 when empty); None when the log is unknown or expired."""
        [last] = await self._execute(_Command(("HGET", self._keys(generation_id)[0], "last")))
        return None if last is None else int(last)

    def waiting(self, generation_id: UUID) -> int:
        """How many :meth:`read` calls of this process wait on the generation (diagnostics, tests)."""
        watch = self._watches.get(generation_id)
        return 0 if watch is None else watch.waiters

    # -- the reading loop ----------------------------------------------------------------

    def _start_reading(self) -> None:
        if not self._closed and (self._reading is None or self._reading.done()):
            self._reading = asyncio.create_task(self._read_forever(), name=f"redis-broker-reader-{self.id}")

    async def _wake_reader(self) -> None:
        """Make the reading loop start a new XREAD, now over a new stream. An entry in its own wake
        stream rather than cancelling its blocked XREAD: a wake-up sent before that XREAD reaches
        Redis is not lost (the XREAD then returns at once)."""
        await self._execute(
            _Command(("XADD", self._wake_key, "MAXLEN", 1, "*", "w", 1)),
            _Command(("PEXPIRE", self._wake_key, self._orphan_ms)),
        )

    async def _read_forever(self) -> None:
        """One blocking XREAD over every stream this process's readers wait on; wakes them with what it read.

        A dropped connection is reopened at once and loses nothing (streams keep their entries,
        the loop resumes from its positions); when Redis stays unreachable, the waiting readers
        get BrokerUnavailable and the loop retries with backoff until it is back."""
        failures = 0
        while True:
            try:
                await self._read_once()
                await asyncio.sleep(READ_PAUSE)
                if failures > 1:
                    logger.warning("redis broker: reading loop reaches Redis again")
                failures = 0
            except (RedisError, OSError) as exc:
                failures += 1
                metrics.broker_error("reading")
                if failures == 1:
                    continue
                if failures == 2:  # once per outage, not at every retry
                    logger.warning("redis broker: reading loop cannot reach Redis (%s); retrying", exc)
                self._fail_watches(f"lost the connection to Redis: {exc}")
                await asyncio.sleep(min(BACKOFF_MIN * 2 ** (failures - 2), BACKOFF_MAX))
            except Exception as exc:
                failures += 1
                logger.exception("redis broker: reading loop failed; retrying")
                self._fail_watches(f"the reading loop failed: {exc!r}")
                await asyncio.sleep(min(BACKOFF_MIN * 2 ** (failures - 1), BACKOFF_MAX))

    async def _read_once(self) -> None:
        now = asyncio.get_running_loop().time()
        for generation_id, watch in list(self._watches.items()):
            if watch.waiters == 0 and (watch.closed or now - watch.idle_since > WATCH_LINGER):
                watch.drop()
                del self._watches[generation_id]
        watches = {watch.key: watch for watch in self._watches.values() if not watch.closed}
        ids = [b"0-%d" % watch.pos for watch in watches.values()]
        response = await self._xread(_resp(*_XREAD, self._wake_key.encode(), *watches, self._wake_id, *ids))
        # {stream: [[id, [field, value]], ...]} (RESP3) or [[stream, entries], ...].
        items: list[Any] = list(response.items()) if isinstance(response, dict) else list(response or [])
        if not items:
            # A whole block with nothing: tell the waiters to check their logs still exist.
            for watch in watches.values():
                if watch.waiters:
                    watch.checks += 1
                    watch.hand_back()
                    watch.wake()
        for key, entries in items:
            if not entries:
                continue
            read = watches.get(key)
            if read is None:  # the wake stream
                self._wake_id = entries[-1][0]
                continue
            if self._watches.get(read.generation_id) is not read:
                continue  # its readers left (a new watch, if any, is read from its own position)
            batch: list[GenerationEvent] = [json_decoder.decode(fields[1]) for _, fields in entries]
            read.batch_from = read.pos if batch[0].seq == read.pos + 1 else None
            read.batch = batch
            read.pos = batch[-1].seq
            read.closed = is_terminal(batch[-1])
            read.deliver(batch, read.batch_from is not None)
            read.wake()

    async def _xread(self, command: bytes) -> Any:
        """Send the reading loop's XREAD (packed by :func:`_resp`) on its own connection and
        return the reply as Redis gave it (redis-py's reshaping into tuples and dicts, and its
        packing of two arguments per stream, were most of a reading process's CPU). On an error
        or a cancellation redis-py drops the connection: the next XREAD reconnects.

        Bounded by asyncio.timeout, not by a socket timeout: with one, redis-py sends through
        asyncio.wait_for, which on Python 3.11 can swallow a cancellation that comes as the send
        completes (the loop then outlived `close`). A dead connection raises TimeoutError."""
        async with asyncio.timeout(BLOCK_MS / 1000 + COMMAND_TIMEOUT):
            await self._reader.initialize()
            connection = self._reader.connection
            assert connection is not None  # a single-connection client has one once initialized
            await connection.send_packed_command(command, check_health=False)
            return await connection.read_response()

    def _fail_watches(self, reason: str) -> None:
        """End every waiting read: they raise BrokerUnavailable(`reason`)."""
        error = BrokerUnavailable(reason)
        for watch in self._watches.values():
            watch.error = error
            parked, watch.parked = watch.parked, []
            for reader in parked:
                reader.fail(error)
            watch.wake()
        self._watches.clear()

    # -- readers -------------------------------------------------------------------------

    async def _count(self, generation_id: UUID, delta: int) -> int:
        keys = (self._readers_key(generation_id), self._keys(generation_id)[0])
        [total] = await self._execute(_Command((self.id, delta, self._orphan_ms), self._count_script, keys))
        return int(total)

    async def add_reader(self, generation_id: UUID) -> int:
        """Count a reader in; returns how many read the generation now, in every process."""
        total = await self._count(generation_id, 1)
        self._counted[generation_id] += 1
        return total

    async def remove_reader(self, generation_id: UUID) -> int:
        """Count a reader out; returns how many are left, in every process."""
        total = await self._count(generation_id, -1)
        self._counted[generation_id] -= 1
        if self._counted[generation_id] <= 0:
            del self._counted[generation_id]
        return total

    async def readers(self, generation_id: UUID) -> int:
        """How many read the generation now, in every process."""
        [counts] = await self._execute(_Command(("HVALS", self._readers_key(generation_id))))
        return sum(max(int(count), 0) for count in counts)

    # -- conversation feeds --------------------------------------------------------------

    async def publish(self, event: ConversationEvent, scope: Scope | None = None) -> None:
        """Deliver a conversation event to every feed of its conversation and, with its `scope`,
        to the conversation lists that may show it, in every process (the scope travels in the
        channel's name)."""
        channel = self._conversation_channels
        if scope is not None:
            channel = f"{channel}{scope.company_id}:{scope.owner_id}:"
        args = (
            f"{channel}{event.conversation_id}",
            self.id,
            type(event).__name__,
            json_encoder.encode(event),
            self.conversation_retain,
            self.conversation_ttl_ms,
        )
        [seq] = await self._execute(
            _Command(args, self._publish_script, self._conversation_keys(event.conversation_id))
        )
        event = msgspec.structs.replace(event, conversation_seq=int(seq))
        # This process's feeds get it here, like the in-process broker's (the pub/sub loop skips it).
        self._feeds.offer(event)
        if scope is not None:
            self._lists.offer(event, scope)

    async def conversation_since(
        self, conversation_id: UUID, since: int | None
    ) -> tuple[int, list[ConversationEvent] | None]:
        """The conversation's latest `seq` and its events after `since` (see Broker)."""
        keys = self._conversation_keys(conversation_id)
        [reply] = await self._execute(_Command((-1 if since is None else since,), self._since_script, keys))
        latest, state, rest = int(reply[0]), reply[1], reply[2:]
        if state != b"ok":
            return latest, None
        events: list[ConversationEvent] = []
        for seq, kind, body in zip(rest[::3], rest[1::3], rest[2::3], strict=True):
            event = _CONVERSATION_DECODERS[kind.decode()].decode(body)
            events.append(msgspec.structs.replace(event, conversation_seq=int(seq)))
        return latest, events

    def _conversation_keys(self, conversation_id: UUID) -> tuple[str, str]:
        tag = f"{{{conversation_id}}}"  # one hash slot for both (Redis Cluster)
        return f"{self.prefix}convseq:{tag}", f"{self.prefix}convlog:{tag}"

    def open_feed(self, conversation_id: UUID) -> ConversationFeed:
        """Start receiving a conversation's events (from any process). A feed opened while Redis is
        unreachable is lost at once: it could not tell what it missed."""
        feed = self._feeds.open(conversation_id)
        self._start_feeding()
        if self._feeds_down:
            feed.lose()
        return feed

    def _start_feeding(self) -> None:
        if not self._closed and (self._feeding is None or self._feeding.done()):
            self._feeding = asyncio.create_task(self._feed_forever(), name=f"redis-broker-feeds-{self.id}")

    def close_feed(self, feed: ConversationFeed) -> None:
        """Stop receiving them."""
        self._feeds.close(feed)

    def open_list_feed(self, company_id: UUID, owner_id: UUID | None) -> ListFeed:
        """Start receiving a conversation list (from any process); lost at once while Redis is
        unreachable, as a conversation feed."""
        feed = self._lists.open(company_id, owner_id)
        self._start_feeding()
        if self._feeds_down:
            feed.lose()
        return feed

    def close_list_feed(self, feed: ListFeed) -> None:
        """Stop receiving it."""
        self._lists.close(feed)

    async def _feed_forever(self) -> None:
        """One pattern subscription to every conversation channel; hands events to this process's feeds.

        Pub/sub does not replay: after a lost connection every open feed is lost (its subscriber
        starts over), then the loop resubscribes, at once the first time, then with backoff."""
        pattern = f"{self.prefix}conv:*"
        failures = 0
        while True:
            try:
                async with self._feeds_redis.pubsub() as pubsub:
                    await pubsub.psubscribe(pattern)
                    await pubsub.subscribe(self._control_channel)
                    while True:
                        message = await pubsub.get_message(timeout=None)
                        if message is None:
                            continue
                        if message["type"] == "psubscribe":
                            failures = 0
                            self._feeds_down = False
                        elif message["type"] == "pmessage":
                            self._dispatch(message["channel"], message["data"])
                        elif message["type"] == "message":
                            self._dispatch_control(message["data"])
            except (RedisError, OSError) as exc:
                metrics.broker_error("subscription")
                if not self._feeds_down:
                    logger.warning("redis broker: lost the conversation feeds' subscription (%s)", exc)
            except Exception:
                logger.exception("redis broker: conversation feeds loop failed")
            self._feeds_down = True
            self._feeds.lose_all()
            self._lists.lose_all()
            failures += 1
            await asyncio.sleep(0 if failures == 1 else min(BACKOFF_MIN * 2 ** (failures - 2), BACKOFF_MAX))

    def _dispatch_control(self, data: bytes) -> None:
        try:
            message = control_decoder.decode(data)
        except msgspec.DecodeError:
            logger.warning("redis broker: ignored a malformed control message")
            return
        if self._control is not None:
            self._control(message)

    def _dispatch(self, channel: bytes, data: bytes) -> None:
        try:
            # `<c>`, or `<company>:<owner>:<c>` for an event published with its scope.
            names = channel.decode().removeprefix(self._conversation_channels).split(":")
            conversation_id = UUID(names[-1])
            scope = Scope(UUID(names[0]), UUID(names[1])) if len(names) == 3 else None
            followed = conversation_id in self._feeds
            listed = scope is not None and self._lists.wants(scope.company_id)
            if not (followed or listed):
                return  # neither a feed of it nor a list of its company here: not even decoded
            origin, kind, seq, body = data.split(b" ", 3)
            if origin == self.id.encode():
                return  # published here: this process's feeds have it already
            event = msgspec.structs.replace(
                _CONVERSATION_DECODERS[kind.decode()].decode(body), conversation_seq=int(seq)
            )
        except (ValueError, KeyError, IndexError, msgspec.DecodeError):
            logger.warning("redis broker: ignored a malformed message on %r", channel)
            return
        if followed:
            self._feeds.offer(event)
        if listed and scope is not None:
            self._lists.offer(event, scope)

    # -- processes -----------------------------------------------------------------------

    def is_peer(self, node: str) -> bool:
        """True for the node names of processes on this Redis prefix."""
        return node.startswith(self.prefix)

    async def heartbeat(self) -> None:
        """This process is alive for the next NODE_TTL seconds."""
        with _unavailable():
            await self._heartbeat_redis.set(f"{self.prefix}node:{self.id}", 1, px=int(NODE_TTL * 1000))

    async def live_nodes(self, nodes: Collection[str]) -> set[str]:
        """Those of `nodes` whose heartbeat has not expired."""
        ordered = [node for node in nodes if self.is_peer(node)]
        if not ordered:
            return set()
        keys = [f"{self.prefix}node:{node.removeprefix(self.prefix)}" for node in ordered]
        found = await self._execute(*(_Command(("EXISTS", key)) for key in keys))
        return {node for node, exists in zip(ordered, found, strict=True) if exists}

    def on_control(self, handler: Callable[[ControlMessage], None]) -> None:
        """Have `handler` called with every control message (the subscription starts now)."""
        self._control = handler
        self._start_feeding()

    async def send_control(self, message: ControlMessage) -> None:
        """Publish a control message to every process on the prefix (this one included)."""
        await self._execute(_Command(("PUBLISH", self._control_channel, control_encoder.encode(message))))

    # -- lifecycle -----------------------------------------------------------------------

    async def ping(self) -> None:
        """Return when Redis answers; raise BrokerUnavailable when it does not (readiness)."""
        with _unavailable():
            await self._redis.ping()

    async def close(self) -> None:
        """Stop the loops, end waiting reads, count this process's readers out, close every connection."""
        self._closed = True
        tasks = [task for task in (self._reading, self._feeding) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._flushes, return_exceptions=True)  # their callers get their replies
        self._fail_watches("the broker was closed")
        self._feeds.clear()
        self._lists.clear()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for generation_id in self._counted:
                    pipe.hdel(self._readers_key(generation_id), self.id)
                pipe.unlink(self._wake_key, f"{self.prefix}node:{self.id}")
                await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning("redis broker: could not count this process's readers out at close (%s)", exc)
        self._counted.clear()
        await self._reader.aclose()
        await self._heartbeat_redis.aclose()
        await self._feeds_redis.aclose()
        await self._redis.aclose()
        await self._pool.aclose()
