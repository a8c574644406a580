"""A reference WebSocket client for chatstream: it sends one message and prints the agent's
answer as it streams, and it survives drops without losing or repeating a token.

    python docs/examples/resume_client.py ws://127.0.0.1:8000/api/ws <key or token> <conversation id> "Hello"

It keeps the two cursors of docs/protocol.md: the conversation's `conversationSeq` (for
`subscribe.since`) and the answer's cursor `<generationId>.<seq>` (for `subscribe.after`).
After a drop it reconnects with exponential backoff and jitter (or the `retryAfter` the
server gave), subscribes with both cursors, and resends its message with the same
`clientMessageId` (the server stores it once). Only the `websockets` package is needed.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import uuid
from typing import Any

import websockets

GIVE_UP = {4401, 4403, 1007, 1008, 1009}  # close codes that retrying cannot fix (docs: Close codes)


class Chat:
    """One conversation, one message, its answer."""

    def __init__(self, url: str, credential: str, conversation_id: str, content: str) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {credential}"}
        self.conversation_id = conversation_id
        self.content = content
        self.client_message_id = str(uuid.uuid4())  # the same on every resend
        self.since: int | None = None  # the conversation's last conversationSeq we have
        self.generation_id: str | None = None  # our answer, once the server acked the message
        self.seq = 0  # the last event of our answer we have
        self.text = ""
        self.retry_after = 0.0

    async def run(self) -> str:
        """Connect until the answer has ended; return its text."""
        attempt = 0
        while True:
            try:
                async with websockets.connect(self.url, additional_headers=self.headers) as ws:
                    if await self.session(ws):
                        return self.text
                    attempt = 0  # the connection worked: the next drop starts the backoff over
            except websockets.ConnectionClosed as closed:
                if closed.rcvd is not None and closed.rcvd.code in GIVE_UP:
                    raise SystemExit(f"closed {closed.rcvd.code}: {closed.rcvd.reason}") from None
            except OSError:
                pass  # refused or unreachable: try again
            delay = max(self.retry_after, random.uniform(0, min(30.0, 0.5 * 2**attempt)))
            self.retry_after, attempt = 0.0, attempt + 1
            print(f"[reconnecting in {delay:.1f} s]", file=sys.stderr, flush=True)
            await asyncio.sleep(delay)

    async def session(self, ws: Any) -> bool:
        """One connection: subscribe with the cursors, (re)send, apply frames. True at the answer's end."""
        subscribe: dict[str, Any] = {"type": "subscribe", "conversationId": self.conversation_id, "ref": "sub"}
        if self.since is not None:
            subscribe["since"] = self.since
        if self.generation_id is not None:
            subscribe["after"] = f"{self.generation_id}.{self.seq}"
        await ws.send(json.dumps(subscribe))
        if self.generation_id is None:  # not acked yet: (re)send, stored once whatever happens
            await ws.send(
                json.dumps(
                    {
                        "type": "send",
                        "conversationId": self.conversation_id,
                        "content": self.content,
                        "clientMessageId": self.client_message_id,
                        "ref": "send",
                    }
                )
            )
        async for raw in ws:
            if self.apply(json.loads(raw)):
                return True
        return False

    def apply(self, frame: dict[str, Any]) -> bool:
        """Apply one frame; True when our answer has ended."""
        kind = frame["type"]
        if "conversationSeq" in frame:  # the ack of subscribe, and every conversation event
            self.since = max(self.since or 0, frame["conversationSeq"])
        if kind == "ack" and frame.get("ref") == "send":
            if frame.get("generation") is None:
                raise SystemExit("the conversation has no agent: nothing will answer")
            self.generation_id = frame["generation"]["id"]
        elif kind == "error" and "generationId" not in frame:
            if frame.get("ref") is not None:
                raise SystemExit(f"refused: {frame['code']}: {frame['message']}")
            self.retry_after = float((frame.get("details") or {}).get("retryAfter", 0))  # a close follows
        elif kind == "conversation.reset":
            pass  # an app would reload the conversation over HTTP here; this one only wants its answer
        elif frame.get("generationId") == self.generation_id and "seq" in frame:
            if frame["seq"] <= self.seq:
                return False  # had it already
            self.seq = frame["seq"]
            if kind == "token":
                self.text += frame["text"]
                print(frame["text"], end="", flush=True)
            elif kind == "snapshot":  # events we missed, no longer kept: the answer so far
                print(frame["text"][len(self.text) :], end="", flush=True)
                self.text = frame["text"]
            elif kind in ("done", "cancelled", "error"):
                print(flush=True)
                return True
        return False


if __name__ == "__main__":
    url, credential, conversation_id, content = sys.argv[1:5]
    asyncio.run(Chat(url, credential, conversation_id, content).run())
