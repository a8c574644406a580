"""The event log of one generation: the producer appends, readers read after a cursor.

Readers are positions (ints), not queues: a reader that stops reading costs nothing,
and the log's memory is bounded by `retain` events plus the answer's parts (kept so
that a reader older than the window can be given one `snapshot`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from uuid import UUID

from app.streaming.direct import DirectReader, deliver_to
from app.streaming.events import ANSWER_EVENTS, GenerationEvent, Snapshot, fold, is_terminal
from app.streaming.parts import AnswerParts, text_of
from app.streaming.wakeup import Wakeup


class GenerationLog:
    """Numbered events of one generation, the last `retain` of them kept."""

    def __init__(self, generation_id: UUID, conversation_id: UUID, retain: int = 1000) -> None:
        if retain < 1:
            raise ValueError("retain must be at least 1")
        self.generation_id = generation_id
        self.conversation_id = conversation_id
        self._events: deque[GenerationEvent] = deque(maxlen=retain)
        self.answer = AnswerParts()
        self._answer_seq = 0  # seq of the last event `answer` covers
        self.last_seq = 0
        self.closed = False
        self._wakeup = Wakeup()  # the waiting readers, woken by every append
        self._parked: list[DirectReader] = []  # caught-up readers the append writes to itself
        self._idle_timer: asyncio.TimerHandle | None = None

    def append(self, event: GenerationEvent) -> None:
        """Add the next event (its seq must follow the last one), write it to every parked
        reader and wake every waiting reader."""
        if self.closed:
            raise RuntimeError(f"generation {self.generation_id} already ended")
        if event.seq != self.last_seq + 1:
            raise ValueError(f"event seq {event.seq} does not follow {self.last_seq}")
        if isinstance(event, ANSWER_EVENTS):
            fold(self.answer, event)  # first: a part event that does not fit is refused, not logged
        self._events.append(event)
        self.last_seq = event.seq
        if not is_terminal(event):
            self._answer_seq = event.seq
        else:
            self.closed = True
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        if self._parked:
            self._parked = deliver_to(self._parked, event)
        self._wakeup.wake()

    def park(self, reader: DirectReader, seq: int) -> bool:
        """Let each next event be written to `reader` by the append itself (see
        app/streaming/direct.py), from `seq` on. False, and nothing changes, unless the
        reader has every event so far and the log is still open: it must read first."""
        if seq != self.last_seq or self.closed:
            return False
        reader.seq = seq
        self._parked.append(reader)
        return True

    def unpark(self, reader: DirectReader) -> None:
        """Stop writing to `reader` (it is not parked any more, or leaves)."""
        if reader in self._parked:
            self._parked.remove(reader)

    @property
    def text(self) -> str:
        """The answer's text so far."""
        return self.answer.text

    def read_after(self, seq: int) -> list[GenerationEvent]:
        """Every event after `seq`, at once. A cursor older than the retained window gets a
        `snapshot` of the answer so far in place of the events it can no longer have."""
        if seq >= self.last_seq:
            return []
        first = self._events[0].seq
        if seq + 1 >= first:
            return self._newer_than(seq)
        parts = self.answer.copy()
        snapshot = Snapshot(
            generation_id=self.generation_id,
            conversation_id=self.conversation_id,
            seq=self._answer_seq,
            text=text_of(parts),
            parts=parts,
        )
        return [snapshot, *self._newer_than(self._answer_seq)]

    def _newer_than(self, seq: int) -> list[GenerationEvent]:
        # From the end: a reader usually lacks only the last few events of a long log.
        newer: list[GenerationEvent] = []
        for event in reversed(self._events):
            if event.seq <= seq:
                break
            newer.append(event)
        newer.reverse()
        return newer

    async def wait_after(self, seq: int, max_wait: float | None = None) -> list[GenerationEvent]:
        """Like :meth:`read_after`, but wait (up to about `max_wait` seconds) for an event if there
        is none yet. Returns [] when the wait ends with nothing new, or when the log is closed and
        the reader has everything.

        The waits share one timer per log (a timer per wait was a large part of a token's cost
        with many readers): it wakes every waiting reader at most `max_wait` seconds after the
        earliest of them began, so an idle wait may end sooner than `max_wait`, never later."""
        while True:
            events = self.read_after(seq)
            if events or self.closed:
                return events
            if max_wait is not None:
                self._wake_by(max_wait)
            await self._wakeup.wait()
            events = self.read_after(seq)
            if events or max_wait is not None:
                return events

    def _wake_by(self, max_wait: float) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time() + max_wait
        if self._idle_timer is not None:
            if self._idle_timer.when() <= at:
                return
            self._idle_timer.cancel()
        self._idle_timer = loop.call_at(at, self._idle)

    def _idle(self) -> None:
        """Wake every waiting reader: those that got nothing report an idle wait."""
        self._idle_timer = None
        self._wakeup.wake()
