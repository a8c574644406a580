"""Direct writes: the producer writes each new event to the readers that are caught up.

Without them every token costs two task switches per reader: the producer's append wakes
the reader's task, which then writes. A reader that is caught up instead *parks* on the
log (:meth:`GenerationLog.park`; with Redis, on the watch of the process's reading loop):
the producer's append (the reading loop) encodes the event (once per encoding, shared by
every parked reader of the log) and starts the reader's write itself.
A write that completes without waiting (the usual case: the socket has room) costs no task
switch at all. A write that has to wait (the client reads slowly), a failure, the terminal
event, or the reader's own need to act (revocation, the idle ping) hands the reader back to
its own task: the task finishes the pending write, then reads the log from its position as
any reader does. So a slow reader never holds up the producer or the other readers, and no
event is written twice or skipped: the reader's position moves only as its writes start,
in log order, and the log is read after it only once the last write finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

from app.streaming.events import GenerationEvent, is_terminal


def start(send: Awaitable[None]) -> Awaitable[None] | None:
    """Run `send` (the coroutine of an ASGI `send` call) here, synchronously, until it first
    has to wait. Returns None when it finished without waiting; else an awaitable that
    finishes it, for the reader's own task to await. Raises what the coroutine raised."""
    if not isinstance(send, Coroutine):
        return send  # not a coroutine (cannot be run here): the reader's task awaits it
    try:
        waiting_for = send.send(None)
    except StopIteration:
        return None
    return _Rest(send, waiting_for)


class _Rest:
    """The rest of a coroutine that :func:`start` ran until it waited for `waiting_for` (an
    asyncio future): awaiting this hands that future to the awaiting task, as the coroutine
    would have, and resumes the coroutine with what the task gets back."""

    def __init__(self, coroutine: Coroutine[Any, Any, None], waiting_for: Any) -> None:
        self._coroutine = coroutine
        self._waiting_for = waiting_for

    def __await__(self) -> Generator[Any, Any, None]:
        waiting_for = self._waiting_for
        try:
            while True:
                try:
                    sent = yield waiting_for
                except BaseException as exc:  # noqa: BLE001 - a cancellation goes into the coroutine, as a task would
                    waiting_for = self._coroutine.throw(exc)
                else:
                    waiting_for = self._coroutine.send(sent)
        except StopIteration:
            return

    def close(self) -> None:
        """Abandon the rest (the reader's task ended without awaiting it)."""
        self._coroutine.close()


def deliver_to(parked: list[DirectReader], event: GenerationEvent) -> list[DirectReader]:
    """Write `event` to every parked reader (each encoding made once, shared); returns those
    that stay parked."""
    shared: dict[object, bytes] = {}
    return [reader for reader in parked if reader.deliver(event, shared)]


class DirectReader:
    """A reader the producer writes to while it is parked on a log. Subclasses say how a
    write starts (:meth:`start_write`); `encoding` names the encoding so that readers that
    share it share each event's bytes (None: this reader's encoding is its own)."""

    encoding: object | None = None

    def __init__(self, encode: Callable[[list[GenerationEvent]], bytes]) -> None:
        self.encode = encode
        self.seq = 0  # the last event this reader has (written, or being written)
        self.ended = False  # it was given the terminal event
        self.stopped = False  # it must not be written to any more (revoked)
        self._pending: Awaitable[None] | None = None
        self._failure: Exception | None = None
        self._woken: asyncio.Future[None] | None = None
        self._idle = False  # the wait's `max_idle` ran out

    def start_write(self, data: bytes) -> Awaitable[None] | None:
        """Start writing `data`; None when done already, else what finishes the write."""
        raise NotImplementedError

    def deliver(self, event: GenerationEvent, shared: dict[object, bytes]) -> bool:
        """Called by the log's append for the next event. True: written, stays parked;
        False: the reader's task takes over (the log forgets it). Never raises."""
        if self.stopped:
            self.hand_back()
            return False
        data = shared.get(self.encoding) if self.encoding is not None else None
        try:
            if data is None:
                data = self.encode([event])
                if self.encoding is not None:
                    shared[self.encoding] = data
            self._pending = self.start_write(data)
        except Exception as exc:  # noqa: BLE001 - the reader's task raises it: the producer goes on
            self._failure = exc
        self.seq = event.seq
        if self._pending is None and self._failure is None and not is_terminal(event):
            return True
        self.ended = is_terminal(event)
        self.hand_back()
        return False

    def hand_back(self) -> None:
        """Have the reader's task run again (it returns from :meth:`wait`)."""
        if self._woken is not None and not self._woken.done():
            self._woken.set_result(None)

    def fail(self, error: Exception) -> None:
        """The source of the events failed: the reader's task raises `error`."""
        self._failure = error
        self.hand_back()

    def stop(self) -> None:
        """No more writes from the producer; the reader's task runs again."""
        self.stopped = True
        self.hand_back()

    async def wait(self, max_idle: float | None) -> bool:
        """Wait, parked, until the task must act (then finish a write the producer started);
        True when `max_idle` seconds passed with nothing written."""
        loop = asyncio.get_running_loop()
        seq = self.seq
        self._idle = False
        self._woken = loop.create_future()
        timer = loop.call_later(max_idle, self._idled) if max_idle is not None else None
        try:
            await self._woken
        finally:
            self._woken = None
            if timer is not None:
                timer.cancel()
        await self.settle()
        return self._idle and self.seq == seq and not self.stopped

    def _idled(self) -> None:
        self._idle = True
        self.hand_back()

    async def settle(self) -> None:
        """Finish the write the producer started, and raise what a write raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def abandon(self) -> None:
        """The reader's task is ending: drop a write it will not finish."""
        pending, self._pending = self._pending, None
        if isinstance(pending, (_Rest, Coroutine)):
            pending.close()
