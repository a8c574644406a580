"""The echo adapter repeats the last user message's effective content, word by word."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from app.chat.schemas import HistoryItem
from app.streaming.adapters import parse_config
from app.streaming.adapters.echo import EchoAdapter
from app.tables import MessageRole

pytestmark = pytest.mark.anyio


def item(role: MessageRole, text: str) -> HistoryItem:
    return HistoryItem(id=uuid.uuid4(), role=role, effective_content=text, created_at=datetime.now(UTC))


async def collect(history: list[HistoryItem], settings: dict[str, object]) -> list[str]:
    return [piece async for piece in EchoAdapter().stream(history, parse_config("echo", settings))]


async def test_words_concatenate_to_the_last_user_message() -> None:
    history = [
        item(MessageRole.user, "first"),
        item(MessageRole.agent, "x"),
        item(MessageRole.user, "hello  big\nworld"),
    ]
    pieces = await collect(history, {"pace": 0})
    assert pieces == ["hello", "  big", "\nworld"]
    assert "".join(pieces) == "hello  big\nworld"


async def test_no_user_message_means_no_answer() -> None:
    assert await collect([item(MessageRole.agent, "x")], {"pace": 0}) == []
    assert await collect([], {}) == []
