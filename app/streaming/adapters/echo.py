"""`echo`: answers with the last user message's effective content, word by word."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from app.chat.schemas import HistoryItem
from app.tables import MessageRole

# A word with the whitespace before it, so the pieces concatenate back to the text.
_WORD = re.compile(r"\s*\S+")
DEFAULT_PACE = 0.05


class EchoAdapter:
    """Settings: `pace` — seconds before each word (default 0.05; 0 allowed)."""

    name = "echo"

    async def stream(self, history: Sequence[HistoryItem], settings: Mapping[str, Any]) -> AsyncIterator[str]:
        pace = float(settings.get("pace", DEFAULT_PACE))
        last_user = next((m for m in reversed(history) if m.role is MessageRole.user), None)
        if last_user is None:
            return
        for word in _WORD.findall(last_user.effective_content):
            # Even at pace 0, yield to the loop so readers and cancellation get in between words.
            await asyncio.sleep(pace)
            yield word
