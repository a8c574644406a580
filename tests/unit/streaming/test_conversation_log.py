"""The in-process conversation logs: numbered, bounded, forgotten when idle."""

from __future__ import annotations

import uuid

from app.streaming.conversation_log import ConversationLogs
from app.streaming.protocol import ConversationDeleted


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_log_idle_past_its_ttl_is_forgotten_and_its_cursors_reset() -> None:
    clock = Clock()
    logs = ConversationLogs(retain=10, ttl=60, clock=clock)
    c = uuid.uuid4()
    stamped = [logs.stamp(ConversationDeleted(conversation_id=c)) for _ in range(3)]
    assert [e.conversation_seq for e in stamped] == [1, 2, 3]
    clock.now += 59
    assert logs.since(c, 1) == (3, stamped[1:])  # still kept
    clock.now += 2
    assert logs.since(c, 1) == (0, None)  # forgotten: a client with a cursor reloads
    assert logs.stamp(ConversationDeleted(conversation_id=c)).conversation_seq == 1  # numbering starts over


def test_idle_logs_are_swept_while_others_are_stamped() -> None:
    clock = Clock()
    logs = ConversationLogs(retain=10, ttl=60, clock=clock)
    for _ in range(50):
        logs.stamp(ConversationDeleted(conversation_id=uuid.uuid4()))
    assert logs.tracked() == 50
    clock.now += 61
    logs.stamp(ConversationDeleted(conversation_id=uuid.uuid4()))
    assert logs.tracked() == 1
