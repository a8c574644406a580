"""`echo`: answers with the last user message's effective content, word by word."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Annotated

import msgspec

from app.streaming.records import HistoryItem
from app.tables import MessageRole

# A word with the whitespace before it, so the pieces concatenate back to the text.
_WORD = re.compile(r"\s*\S+")


class EchoConfig(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    # Seconds before each word; 0 answers as fast as the server can.
    pace: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.05


class EchoAdapter:
    """Repeats the user's last message: the default agent, and the one tests and benchmarks use."""

    name = "echo"

    async def stream(self, history: Sequence[HistoryItem], config: EchoConfig) -> AsyncGenerator[str]:
        last_user = next((m for m in reversed(history) if m.role is MessageRole.user), None)
        if last_user is None:
            return
        for word in _WORD.findall(last_user.effective_content):
            # Even at pace 0, yield to the loop so readers and cancellation get in between words.
            await asyncio.sleep(config.pace)
            yield word

    async def aclose(self) -> None:
        """Nothing to release."""
