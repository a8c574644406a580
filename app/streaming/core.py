"""The streaming core: runs generations and serves their events to readers.

A generation is a task owned by the core, never by a request: it runs the agent's
adapter, appends numbered events to the generation's log in the broker, and writes
the outcome to the database (message and generation row in one transaction) before
announcing it. Readers follow the log from a cursor; when the last one leaves, the
core waits `disconnect_grace` seconds for one to come back, then cancels.

With a shared broker (Redis) several processes serve the same generations: any of them
reads any log; a cancel, or the last reader leaving, reaches the producing process as a
control message; each process keeps a heartbeat in the broker, and the others end the
generations of a process whose heartbeat stopped (`producer_lost`).

The core also knows which open sockets and streams of its process use which credential
(`credentials`): a revoked key or an ended session closes them on every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

import msgspec

from app import metrics
from app.errors import invalid_field
from app.streaming import scopes
from app.streaming.adapters import (
    Adapter,
    AdapterConfigError,
    AdapterError,
    AnswerEnd,
    AnswerItem,
    EndPart,
    build_adapters,
    parse_config,
)
from app.streaming.answer_builder import AnswerBuilder
from app.streaming.broker import Broker, BrokerUnavailable, ConversationFeed, ListFeed
from app.streaming.control import CancelRequest, ControlMessage, CredentialRevoked, ReadersGone
from app.streaming.credentials import CredentialHolders
from app.streaming.direct import DirectReader
from app.streaming.events import (
    Cancelled,
    Cursor,
    Done,
    Error,
    GenerationEvent,
    Snapshot,
    Start,
    is_terminal,
)
from app.streaming.observers import AnswerEnded, AnswerObserver, AnswerStarted
from app.streaming.parts import text_of
from app.streaming.policy import BusyPolicy, PartialPolicy, StreamPolicy
from app.streaming.protocol import (
    ConversationCreated,
    ConversationDeleted,
    ConversationEvent,
    ConversationUpdated,
    GenerationStarted,
    MessageCreated,
)
from app.streaming.quotas import Quotas
from app.streaming.records import GenerationOut
from app.streaming.store import AnswerStore
from app.tables import GenerationStatus

logger = logging.getLogger("chatstream.streaming")

# Tries to store an answer's outcome before giving up (its readers then get `storage_failed`).
STORE_ATTEMPTS = 4
# Shared broker: how often a process renews its heartbeat, and looks for generations whose
# producer's heartbeat expired (the broker keeps a heartbeat NODE_TTL seconds). A killed
# producer's readers get `producer_lost` within about NODE_TTL + REAP_INTERVAL seconds.
HEARTBEAT_INTERVAL = 0.5
REAP_INTERVAL = 1.0
# How long a cancel waits for another process's producer to report the outcome.
REMOTE_CANCEL_WAIT = 10.0
PRODUCER_LOST = "producer_lost"

# The conversation events that conversation lists show (see protocol.list_frame).
_LISTED = (MessageCreated, ConversationCreated, ConversationUpdated, ConversationDeleted)

# Every core of this process, so that a server stopping can end their answers first.
_cores: weakref.WeakSet[StreamingCore] = weakref.WeakSet()


async def stop_all_answers(reason: str) -> None:
    """Cancel every answer produced by this process (e.g. `shutdown`) and wait for their ends."""
    await asyncio.gather(*(core.cancel_all(reason) for core in list(_cores)), return_exceptions=True)


def terminal_seq(generation: GenerationOut) -> int:
    """Seq of a finished generation's terminal event: `start`, its answer events, the end."""
    return generation.chunk_count + 2


class Starter(Protocol):
    """Whose running-answers quota an answer counts against (a caller's principal)."""

    @property
    def key_id(self) -> UUID: ...

    @property
    def company_id(self) -> UUID: ...


@dataclass
class _Producer:
    generation: GenerationOut
    policy: StreamPolicy
    task: asyncio.Task[None] | None = None
    cancel_reason: str | None = None
    finishing: bool = False
    grace_timer: asyncio.TimerHandle | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Whose running-answers quota the answer counts against, until it ends.
    starter: Starter | None = None
    company_id: UUID | None = None


class StreamingCore:
    """Owns every generation produced by this process and serves reads of any generation."""

    def __init__(
        self,
        broker: Broker,
        policy: StreamPolicy,
        *,
        store: AnswerStore,
        adapters: Mapping[str, Adapter] | None = None,
        sse_ping_interval: float = 15.0,
        credential_recheck: float = 60.0,
        quotas: Quotas | None = None,
    ) -> None:
        self.broker = broker
        self.policy = policy
        self.store = store
        self.quotas = quotas or Quotas()
        # Reserved generations not launched yet, with the caller whose answer quota they hold.
        self._reserved: dict[UUID, Starter] = {}
        # conversation -> (its lock for starting answers, how many hold or wait for it)
        self._starting: dict[UUID, tuple[asyncio.Lock, list[int]]] = {}
        self.sse_ping_interval = sse_ping_interval
        # Seconds between re-checks of the open connections' credentials.
        self.credential_recheck = credential_recheck
        self.credentials = CredentialHolders(store.invalid_credentials)
        self._revocation_hooks: list[Callable[[UUID, UUID | None], None]] = []
        self.adapters = dict(build_adapters() if adapters is None else adapters)
        self._producers: dict[UUID, _Producer] = {}
        self.observers: list[AnswerObserver] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._closing = False
        _cores.add(self)

    # -- lifecycle ---------------------------------------------------------------------

    async def startup(self) -> None:
        """Alone (in-process broker): end what a previous run left running. Shared: start the
        heartbeat and the watch for generations of processes that died, and take control messages.
        Either way, re-check the open connections' credentials now and then."""
        self.broker.on_control(self._on_control)
        self._spawn(self._every(self.credential_recheck, self.credentials.recheck, "re-checking credentials"))
        if not self.broker.shared:
            count = await self.store.interrupt_orphans()
            if count:
                logger.warning("marked %d generation(s) left running by a previous run as interrupted", count)
            return
        try:
            await self.broker.heartbeat()
        except BrokerUnavailable as exc:  # serve anyway: /readyz says not ready until it is back
            logger.error("the broker is not reachable at startup: %s", exc)
        self._spawn(self._every(HEARTBEAT_INTERVAL, self.broker.heartbeat, "heartbeat"))
        self._spawn(self._every(REAP_INTERVAL, self.reap_orphans, "looking for orphaned generations"))

    async def _every(self, interval: float, job: Callable[[], Awaitable[Any]], what: str) -> None:
        """Run `job` every `interval` seconds until shutdown; a failure (broker or database
        down) is logged once per outage and retried next time."""
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                await job()
            except Exception as exc:  # noqa: BLE001 - retried next round; logged when it starts failing
                if not failing:
                    logger.warning("%s failed (retrying every %g s): %s", what, interval, exc)
                failing = True
            else:
                if failing:
                    logger.info("%s works again", what)
                failing = False

    async def cancel_conversation(self, conversation_id: UUID, reason: str) -> None:
        """Cancel the conversation's running answer, wherever it is produced."""
        running = await self.store.running_generation_id(conversation_id)
        if running is not None:
            await self.cancel(running, reason)

    async def cancel_all(self, reason: str) -> None:
        """Cancel every generation this process produces and wait until their outcomes are stored."""
        self._closing = True
        await asyncio.gather(*(self.cancel(gid, reason) for gid in list(self._producers)), return_exceptions=True)

    async def shutdown(self) -> None:
        """Cancel every running generation (reason `shutdown`), then release the broker and
        the adapters' connections."""
        await self.cancel_all("shutdown")
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.broker.close()
        await asyncio.gather(*(adapter.aclose() for adapter in self.adapters.values()))

    # -- several processes -------------------------------------------------------------

    def _on_control(self, message: ControlMessage) -> None:
        """A control message from any process (this one included); only the producer acts,
        except on a revoked credential, which every process acts on."""
        if isinstance(message, CredentialRevoked):
            self._credential_revoked(message.key_id, message.session_id)
            return
        producer = self._producers.get(message.generation_id)
        if producer is None or self._closing:
            return
        if isinstance(message, CancelRequest):
            self._spawn(self.cancel(message.generation_id, message.reason))
        elif isinstance(message, ReadersGone):
            self._spawn(self._start_grace(message.generation_id))

    async def revoke_credentials(self, key_id: UUID, session_id: UUID | None = None) -> None:
        """A key was revoked (`session_id` None) or a session ended: have every process close
        the connections that use it. Broker down: this process's close now, the others' at
        their next re-check."""
        for hook in self._revocation_hooks:  # here at once, before the message goes round
            hook(key_id, session_id)
        try:
            await self.broker.send_control(CredentialRevoked(key_id=key_id, session_id=session_id))
        except BrokerUnavailable as exc:
            logger.warning("key %s: could not announce a revoked credential: %s", key_id, exc)
            self.credentials.revoke(key_id, session_id)

    def on_revoked(self, hook: Callable[[UUID, UUID | None], None]) -> None:
        """Have `hook(key_id, session_id)` called whenever a credential is revoked on any process
        (for caches of credentials: a session id None means the key and all its sessions)."""
        self._revocation_hooks.append(hook)

    def _credential_revoked(self, key_id: UUID, session_id: UUID | None) -> None:
        for hook in self._revocation_hooks:
            hook(key_id, session_id)
        self.credentials.revoke(key_id, session_id)

    async def reap_orphans(self) -> int:
        """End the running generations whose producing process stopped (its heartbeat expired):
        `interrupted` in the database, `error producer_lost` to their readers. Any process may
        do it; the first one wins. Returns how many this call ended."""
        candidates = {
            gid: node
            for gid, node in await self.store.running_producers()
            if node is not None and gid not in self._producers and self.broker.is_peer(node)
        }
        if not candidates:
            return 0
        alive = await self.broker.live_nodes(set(candidates.values()))
        ended = 0
        for gid, node in candidates.items():
            if node not in alive and await self._end_orphan(gid):
                logger.warning("generation %s: its producer %s stopped; ended as interrupted", gid, node)
                ended += 1
        return ended

    async def _end_orphan(self, generation_id: UUID) -> bool:
        last = await self.broker.last_seq(generation_id)  # None: the log is gone too
        chunks = max(last - 1, 0) if last else 0
        message = "the server process producing this answer stopped"
        if not await self.store.interrupt(generation_id, chunks, f"{PRODUCER_LOST}: {message}"):
            return False
        generation = await self.store.load_generation(generation_id)
        if last is None or generation is None:
            return True
        ids: dict[str, Any] = {"generation_id": generation_id, "conversation_id": generation.conversation_id}
        if last == 0:  # it died before `start`: the log still tells a whole story
            await self.broker.append(
                Start(**ids, seq=1, reply_to_id=generation.reply_to_id, agent_id=generation.agent_id)
            )
            last = 1
        with contextlib.suppress(Exception):  # another process got there first (Redis refuses the seq)
            await self.broker.append(Error(**ids, seq=last + 1, code=PRODUCER_LOST, message=message))
            await self.broker.close_log(generation_id)
        return True

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def policy_for(
        self,
        *,
        if_busy: BusyPolicy | None = None,
        partial: PartialPolicy | None = None,
        disconnect_grace: float | None = None,
    ) -> StreamPolicy:
        """The server's policy with a request's overrides applied."""
        changes: dict[str, Any] = {
            "if_busy": if_busy,
            "partial": partial,
            "disconnect_grace": disconnect_grace,
        }
        return msgspec.structs.replace(self.policy, **{k: v for k, v in changes.items() if v is not None})

    # -- producing ---------------------------------------------------------------------

    def is_local(self, generation_id: UUID) -> bool:
        """True while this process produces the generation."""
        return generation_id in self._producers

    @contextlib.asynccontextmanager
    async def one_start_at_a_time(self, conversation_id: UUID) -> AsyncIterator[None]:
        """Answers of one conversation start one after another in this process: a post that
        loses to a concurrent one is told 409 before it holds a place in the key's running
        answers (12 concurrent posts once held all 10, and the one that won got 429)."""
        lock, users = self._starting.setdefault(conversation_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._starting[conversation_id]

    async def reserve(self, conversation_id: UUID) -> UUID:
        """A new generation id whose (empty) log exists before its `running` row does, so a
        reader that finds the row always finds the log. Pair with :meth:`launch`, or
        :meth:`release` if the row could not be created."""
        generation_id = uuid.uuid4()
        await self.broker.open_log(generation_id, conversation_id)
        return generation_id

    def count_answer(self, generation_id: UUID, starter: Starter) -> None:
        """Count a reserved generation against `starter`'s running answers until it ends
        (or is released); past the key's or company's cap, raise `TooManyRequests`
        (`too_many_answers`) and count nothing."""
        full = self.quotas.answers.acquire(starter.key_id, starter.company_id)
        if full is not None:
            raise self.quotas.answers.refusal(full, "too_many_answers")
        self._reserved[generation_id] = starter

    async def release(self, generation_id: UUID) -> None:
        """Forget a reserved generation that never started."""
        self._end_quota(self._reserved.pop(generation_id, None))
        await self.broker.discard_log(generation_id)

    def _end_quota(self, starter: Starter | None) -> None:
        if starter is not None:
            self.quotas.answers.release(starter.key_id, starter.company_id)

    def _answer_ended(self, producer: _Producer) -> None:
        """Give the answer's quota back (once: from its end, or when its task ends unstarted)."""
        self._end_quota(producer.starter)
        producer.starter = None

    async def launch(
        self,
        generation: GenerationOut,
        adapter_name: str,
        adapter_settings: Mapping[str, Any],
        policy: StreamPolicy | None = None,
    ) -> None:
        """Start producing a reserved generation whose `running` row was just created."""
        starter = self._reserved.pop(generation.id, None)
        producer = _Producer(
            generation=generation,
            policy=policy or self.policy,
            starter=starter,
            company_id=starter.company_id if starter is not None else None,
        )
        self._producers[generation.id] = producer
        adapter = self.adapters.get(adapter_name)
        producer.task = asyncio.create_task(
            self._produce(producer, adapter, adapter_name, dict(adapter_settings)),
            name=f"generation-{generation.id}",
        )
        # A task cancelled before its first step never runs `_produce`'s `finally`.
        producer.task.add_done_callback(lambda _: self._answer_ended(producer))
        try:
            await self.publish(
                GenerationStarted(conversation_id=generation.conversation_id, generation_id=generation.id)
            )
        except BrokerUnavailable as exc:  # the answer runs (and fails on its own if the broker stays down)
            logger.warning("generation %s: could not announce it: %s", generation.id, exc)

    async def _produce(
        self, producer: _Producer, adapter: Adapter | None, adapter_name: str, settings: dict[str, Any]
    ) -> None:
        gen = producer.generation
        seq = 0
        built = AnswerBuilder()
        ttft_ms: int | None = None
        end = AnswerEnd()

        async def emit(event_type: type[GenerationEvent], **fields: Any) -> None:
            nonlocal seq
            event = event_type(generation_id=gen.id, conversation_id=gen.conversation_id, seq=seq + 1, **fields)
            try:
                await self.broker.append(event)
            except asyncio.CancelledError:
                # Cancelled mid-append (the broker lets the append settle first): the event may
                # be in the log; the terminal event must take the seq after the log's last one.
                with contextlib.suppress(BrokerUnavailable):
                    if (await self.broker.last_seq(gen.id) or 0) >= event.seq:
                        seq = event.seq
                raise
            except (KeyError, ValueError, RuntimeError) as exc:
                # The log is gone (Redis restarted empty) or was ended by another process (which
                # took this one for dead): nobody can read what comes next.
                raise BrokerUnavailable(f"the answer's log no longer takes events: {exc!r}") from exc
            seq = event.seq  # only once it is in the log: the next event must follow it

        async def finish(status: GenerationStatus, keep: bool, error: str | None) -> UUID | None:
            """Store the outcome (retrying a failed write a few times), then tell subscribers."""
            for attempt in range(STORE_ATTEMPTS):
                try:
                    # Shielded: a second cancellation must not leave the row `running` or the message half-written.
                    stored = await asyncio.shield(
                        self.store.finish_generation(
                            gen,
                            status,
                            parts=built.answer.ended(complete=status is GenerationStatus.done) if keep else None,
                            token_count=built.pieces if end.token_count is None else end.token_count,
                            chunk_count=built.events,
                            ttft_ms=ttft_ms,
                            finish_reason=end.finish_reason if status is GenerationStatus.done else None,
                            error=error,
                        )
                    )
                    break
                except Exception:
                    if attempt == STORE_ATTEMPTS - 1:
                        raise
                    logger.warning("generation %s: storing its outcome failed, retrying", gen.id, exc_info=True)
                    await asyncio.sleep(0.2 * 2**attempt)
            if stored is None:
                return None
            await self.publish(MessageCreated(conversation_id=gen.conversation_id, message=stored))
            return stored.id

        # The outcome to store, and the terminal event that announces it (its messageId added).
        status = GenerationStatus.failed
        keep = False
        error: str | None = "adapter_failed: the agent failed to answer"
        terminal: tuple[type[GenerationEvent], dict[str, Any]] = (
            Error,
            {"code": "adapter_failed", "message": "the agent failed to answer"},
        )
        started = time.monotonic()
        try:
            try:
                for observer in self.observers:
                    observer.answer_started(
                        AnswerStarted(gen.id, gen.conversation_id, producer.company_id, adapter_name)
                    )
                await emit(Start, reply_to_id=gen.reply_to_id, agent_id=gen.agent_id)
                if adapter is None:
                    raise AdapterError("unknown_adapter", f"this server has no adapter named {adapter_name!r}")
                try:
                    config = parse_config(adapter_name, settings)
                except AdapterConfigError as exc:
                    raise AdapterError("invalid_agent_config", f"the agent's config: {exc}") from None
                history = await self.store.load_history(gen.conversation_id)
                # aclosing: a cancel while the core awaits an emit still closes the adapter's
                # stream (and its upstream connection) at once, not when garbage collected.
                items: AsyncGenerator[AnswerItem] = adapter.stream(history, config)
                async with contextlib.aclosing(items) as answer:
                    async for item in answer:
                        if isinstance(item, AnswerEnd):
                            end = item
                            continue
                        step = built.event(item)
                        if step is None:
                            continue
                        if ttft_ms is None:
                            ttft_ms = round((time.monotonic() - started) * 1000)
                        await emit(step[0], **step[1])
                for key in built.open_keys():  # parts the adapter left open end with the answer
                    closing = built.event(EndPart(key))
                    if closing is not None:
                        await emit(closing[0], **closing[1])
                producer.finishing = True  # from here on, a cancel request only reports the outcome
                status, keep, error = GenerationStatus.done, True, None
                terminal = (
                    Done,
                    {
                        "token_count": built.pieces if end.token_count is None else end.token_count,
                        "finish_reason": end.finish_reason,
                    },
                )
            except asyncio.CancelledError:
                # The core cancelled its own task: the cancellation ends here, as an outcome.
                reason = producer.cancel_reason or "shutdown"  # cancelled with no reason: the process is stopping
                status, keep, error = GenerationStatus.cancelled, producer.policy.partial == "keep", reason
                terminal = (Cancelled, {"reason": reason})
            except BrokerUnavailable as exc:
                logger.warning("generation %s failed: its events cannot be delivered: %s", gen.id, exc)
                lost = "the answer's events could not be delivered"  # (the broker's address stays in the log)
                status, keep, error = (
                    GenerationStatus.failed,
                    producer.policy.partial == "keep",
                    f"broker_unavailable: {lost}",
                )
                terminal = (Error, {"code": "broker_unavailable", "message": lost})
            except AdapterError as exc:
                logger.warning("generation %s failed: %s: %s", gen.id, exc.code, exc.message)
                status, keep, error = (
                    GenerationStatus.failed,
                    producer.policy.partial == "keep",
                    f"{exc.code}: {exc.message}",
                )
                terminal = (Error, {"code": exc.code, "message": exc.message, "retry_after": exc.retry_after})
            except Exception:
                logger.exception("generation %s failed", gen.id)
            try:
                message_id = await finish(status, keep and bool(built.answer.parts), error)
            except Exception:
                logger.exception("generation %s: its outcome could not be stored", gen.id)
                terminal, message_id = (
                    (Error, {"code": "storage_failed", "message": "the answer could not be stored"}),
                    None,
                )
            if terminal[0] is Done and message_id is None:
                terminal = (Error, {"code": "generation_ended", "message": "the generation was ended elsewhere"})
            try:
                await emit(terminal[0], message_id=message_id, **terminal[1])
            except BrokerUnavailable as exc:
                # Stored already: readers that come back get the outcome from the database.
                logger.warning("generation %s: its end could not be announced: %s", gen.id, exc)
            ended = AnswerEnded(
                gen.id,
                gen.conversation_id,
                producer.company_id,
                adapter_name,
                status,
                ttft_ms,
                time.monotonic() - started,
                built.pieces if end.token_count is None else end.token_count,
                terminal[1].get("code") or terminal[1].get("reason"),
            )
            for observer in self.observers:
                observer.answer_ended(ended)
        finally:
            # With the producer gone, before `done`: whoever waited for the end (an
            # interrupting post) may start the next answer at once.
            self._answer_ended(producer)
            self._producers.pop(gen.id, None)
            if producer.grace_timer is not None:
                producer.grace_timer.cancel()
            with contextlib.suppress(BrokerUnavailable):  # if so, the log expires on its own
                await asyncio.shield(self.broker.close_log(gen.id))
            producer.done.set()

    async def cancel(self, generation_id: UUID, reason: str = "user") -> None:
        """Stop a generation and wait until its outcome is stored (bounded, when another
        process produces it). A generation that is finishing or over is left alone."""
        producer = self._producers.get(generation_id)
        if producer is None:
            if self.broker.shared:
                await self._cancel_remote(generation_id, reason)
            return
        if producer.task is None:
            return
        if not producer.finishing and producer.cancel_reason is None:
            producer.cancel_reason = reason
            producer.task.cancel()
        await producer.done.wait()

    async def _cancel_remote(self, generation_id: UUID, reason: str) -> None:
        generation = await self.store.load_generation(generation_id)
        if generation is None or generation.status is not GenerationStatus.running:
            return
        after = await self.broker.last_seq(generation_id) or 0
        await self.broker.send_control(CancelRequest(generation_id=generation_id, reason=reason))
        # The producer stores the outcome before it appends the terminal event: once that
        # event is here, the database has the outcome.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REMOTE_CANCEL_WAIT):
                async for _ in self.follow(generation_id, after, REAP_INTERVAL):
                    pass

    async def answer_unanswered(
        self, conversation: dict[str, Any], starter: Starter | None = None
    ) -> GenerationOut | None:
        """Start answering the conversation's last turn if it waits for an answer (an
        unanswered user message, or the last tool result an answer waited for) and the
        conversation has an agent (what a stream reader arriving first expects), counted
        against `starter`'s quota. Returns the generation that is now running, if any."""
        answering = await self.store.waiting_turn(conversation)
        if answering is None:
            return None
        generation_id = await self.reserve(conversation["id"])
        generation = None

        def admit() -> None:
            # Counted once the conversation was free (readers racing to start it are not
            # refused); past the cap this raises 429 and the row is rolled back.
            if starter is not None:
                self.count_answer(generation_id, starter)

        try:
            generation = await self.store.start_generation(
                conversation["id"], answering, generation_id, self.broker.node, admit
            )
        finally:
            if generation is None:  # someone else started it: the caller will find it running
                await self.release(generation_id)
        if generation is not None:
            await self.launch(generation, answering.adapter, answering.config)
        return generation

    async def resolve_stream(
        self,
        conversation: dict[str, Any],
        cursor: Cursor | None,
        *,
        start_unanswered: bool = True,
        cursor_field: str = "cursor",
        cursor_source: str = "query",
        starter: Starter | None = None,
    ) -> tuple[UUID, int] | None:
        """What a stream reader of this conversation follows, as (generation, after seq):
        the cursor's generation while the reader is missing any of it; else the running
        generation from its start; else (with `start_unanswered`) a new answer to an
        unanswered user message, started as `starter`'s; else None (nothing to stream)."""
        if cursor is not None:
            producer = self._producers.get(cursor.generation_id)
            # Produced here: the row as inserted is what the database has (it is running) until its end.
            generation = producer.generation if producer else await self.store.load_generation(cursor.generation_id)
            if generation is None or generation.conversation_id != conversation["id"]:
                raise invalid_field(
                    cursor_field, "not a cursor of this conversation", source=cursor_source, code="invalid_cursor"
                )
            if generation.status is GenerationStatus.interrupted and generation.chunk_count == 0:
                # Its length died with the process that produced it: any cursor may be right.
                return generation.id, cursor.seq
            live = generation.status is GenerationStatus.running
            last = await self.broker.last_seq(generation.id) if live else terminal_seq(generation)
            if last is not None and cursor.seq > last:
                message = "ahead of the answer: no event has this seq yet"
                raise invalid_field(cursor_field, message, source=cursor_source, code="invalid_cursor")
            if live or cursor.seq < terminal_seq(generation):
                return generation.id, cursor.seq
        for _ in range(2):  # a second look if a concurrent reader started the answer first
            running = await self.store.running_generation_id(conversation["id"])
            if running is not None:
                return running, 0
            started = await self.answer_unanswered(conversation, starter) if start_unanswered else None
            if started is not None:
                return started.id, 0
            if not start_unanswered:
                break
        return None

    # -- conversation events -----------------------------------------------------------

    async def publish(self, event: ConversationEvent, scope: scopes.Scope | None = None) -> None:
        """Tell every subscriber of the event's conversation (message, edit, rename, new answer)
        and, for what conversation lists show (a creation, a change, a deletion, a new message),
        the lists that may show the conversation. Its `scope` (company and owner) is found when
        not given: from what this process learned of the conversation, else from the database."""
        if scope is None and isinstance(event, _LISTED):
            scope = await self._scope_of(event.conversation_id)
        await self.broker.publish(event, scope)

    async def _scope_of(self, conversation_id: UUID) -> scopes.Scope | None:
        scope = scopes.known.get(conversation_id)
        if scope is not None:
            return scope
        try:
            found = await self.store.conversation_scope(conversation_id)
        except Exception:  # noqa: BLE001 - the conversation's subscribers are told anyway
            logger.warning("conversation %s: its scope could not be read; lists miss this event", conversation_id)
            return None
        if found is not None:  # None: deleted meanwhile (its deletion is announced with its scope)
            scopes.known.remember(conversation_id, *found)
        return found

    def open_feed(self, conversation_id: UUID) -> ConversationFeed:
        """Start receiving a conversation's events; close with :meth:`close_feed`."""
        return self.broker.open_feed(conversation_id)

    def close_feed(self, feed: ConversationFeed) -> None:
        self.broker.close_feed(feed)

    async def conversation_since(
        self, conversation_id: UUID, since: int | None
    ) -> tuple[int, list[ConversationEvent] | None]:
        """The conversation's latest event `seq`, and its events after `since` (None: some of
        them are no longer kept; the client must reload the conversation)."""
        return await self.broker.conversation_since(conversation_id, since)

    def open_list_feed(self, company_id: UUID, owner_id: UUID | None) -> ListFeed:
        """Start receiving the conversation list of `owner_id` in the company (None: every
        conversation of the company, an admin's list); close with :meth:`close_list_feed`."""
        return self.broker.open_list_feed(company_id, owner_id)

    def close_list_feed(self, feed: ListFeed) -> None:
        self.broker.close_list_feed(feed)

    # -- reading -----------------------------------------------------------------------

    async def attach(self, generation_id: UUID) -> None:
        """A reader starts following the generation: no grace countdown while it reads."""
        readers = await self.broker.add_reader(generation_id)
        producer = self._producers.get(generation_id)
        metrics.reader_attached(generation_id, readers, produced_here=producer is not None)
        if producer is not None and producer.grace_timer is not None:
            producer.grace_timer.cancel()
            producer.grace_timer = None

    def detach(self, generation_id: UUID) -> None:
        """A reader left. Synchronous on purpose: safe in a cancelled response's `finally`;
        the bookkeeping runs as the core's own task."""
        metrics.reader_detached()
        self._spawn(self._reader_left(generation_id))

    async def _reader_left(self, generation_id: UUID) -> None:
        try:
            left = await self.broker.remove_reader(generation_id)
            if left > 0 or self._closing:
                return
            if generation_id in self._producers:
                await self._start_grace(generation_id)
            elif self.broker.shared:
                await self.broker.send_control(ReadersGone(generation_id=generation_id))
        except BrokerUnavailable as exc:
            logger.warning("generation %s: a reader left but the broker is down: %s", generation_id, exc)

    async def _start_grace(self, generation_id: UUID) -> None:
        """No reader is left (on any process): wait `disconnect_grace` for one, then cancel."""
        producer = self._producers.get(generation_id)
        if producer is None:
            return
        grace = producer.policy.disconnect_grace
        if grace <= 0:
            await self._cancel_if_unread(generation_id)  # a reader may have come in on another process
            return
        loop = asyncio.get_running_loop()
        if producer.grace_timer is not None:
            producer.grace_timer.cancel()
        producer.grace_timer = loop.call_later(grace, self._grace_expired, generation_id)

    def _grace_expired(self, generation_id: UUID) -> None:
        self._spawn(self._cancel_if_unread(generation_id))

    async def _cancel_if_unread(self, generation_id: UUID) -> None:
        try:
            unread = await self.broker.readers(generation_id) == 0
        except BrokerUnavailable:
            unread = False  # cannot tell: let the answer finish
        if unread:
            await self.cancel(generation_id, "disconnected")

    async def follow(
        self, generation_id: UUID, after: int, max_idle: float | None, direct: DirectReader | None = None
    ) -> AsyncIterator[list[GenerationEvent]]:
        """Batches of every event after `after`, up to and including the terminal event.
        Everything that piled up since the last batch comes as one batch (readers write it
        at once). An empty batch means nothing happened for `max_idle` seconds.

        With `direct`, whenever the reader is caught up with a log this process holds, the
        producer writes the next events to it itself (app/streaming/direct.py): those are
        not yielded, and `direct.seq` is where the reader is."""
        batch: list[GenerationEvent] | None
        while True:
            if direct is not None and self.broker.park(generation_id, direct, after):
                try:
                    idle = await direct.wait(max_idle)
                finally:
                    self.broker.unpark(generation_id, direct)
                    direct.abandon()
                after = direct.seq
                if direct.ended or direct.stopped:
                    return
                if not idle:
                    continue  # a write had to wait (now done) or events came meanwhile: read on
                batch = []
            else:
                batch = await self.broker.read(generation_id, after, max_idle)
            if batch is None:  # the log expired or was never here: the database has the outcome
                batch = await self.stored_events(generation_id, after)
                if batch:
                    yield batch
                return
            if batch:
                yield batch
                after = batch[-1].seq
                if is_terminal(batch[-1]):
                    return
            else:
                generation = await self.store.load_generation(generation_id)
                ended = generation is not None and generation.status is not GenerationStatus.running
                if ended and generation is not None and after >= terminal_seq(generation):
                    return  # the reader already has the end
                yield []

    async def stored_events(self, generation_id: UUID, after: int) -> list[GenerationEvent]:
        """What a reader at `after` is missing of an ended generation whose log is gone:
        a `snapshot` of the stored answer (if it missed any of it) and the terminal event."""
        gen = await self.store.load_generation(generation_id)
        if gen is None:
            return []
        ids: dict[str, Any] = {"generation_id": gen.id, "conversation_id": gen.conversation_id}
        if gen.status is GenerationStatus.running:
            message = "the answer's events are not available"
            return [Error(**ids, seq=after + 1, code="log_unavailable", message=message)]
        if gen.status is GenerationStatus.interrupted and gen.chunk_count == 0 and after >= 2:
            # The first reader back after a crash fixes where the interrupted answer ends.
            gen = await self.store.settle_interrupted_length(gen.id, after - 1) or gen
        end = terminal_seq(gen)
        if after >= end:
            return []
        events: list[GenerationEvent] = []
        if gen.result_message_id is not None and after < end - 1:
            parts = await self.store.stored_answer(gen.result_message_id)
            if parts is not None:
                events.append(Snapshot(**ids, seq=end - 1, text=text_of(parts), parts=parts))
        code, _, message = (gen.error or "").partition(": ")
        terminal: GenerationEvent
        if gen.status is GenerationStatus.done and gen.result_message_id is not None:
            terminal = Done(
                **ids,
                seq=end,
                message_id=gen.result_message_id,
                token_count=gen.token_count,
                finish_reason=gen.finish_reason or "stop",
            )
        elif gen.status is GenerationStatus.cancelled:
            terminal = Cancelled(**ids, seq=end, reason=gen.error or "shutdown", message_id=gen.result_message_id)
        elif gen.status is GenerationStatus.interrupted:
            known = code if message and code.isidentifier() else None  # e.g. `producer_lost: ...`
            terminal = Error(
                **ids,
                seq=end,
                code=known or "interrupted",
                message=(message if known else gen.error) or "the answer was interrupted",
            )
        else:
            terminal = Error(
                **ids,
                seq=end,
                code=code or "failed",
                message=message or "the answer failed",
                message_id=gen.result_message_id,
            )
        events.append(terminal)
        return events
