"""Whose each conversation is: its company and its owner, for the conversation lists.

A conversation event reaches the conversation list of every socket that may list the
conversation (`subscribe_conversations`, see docs/protocol.md): its owner's, and those of
its company's admins. Routing it needs the conversation's :class:`Scope`. A conversation's
company and owner never change, so what any request of this process learned about one
(app/chat/conversations.py tells :data:`known` whenever it loads a conversation) holds for
as long as the process runs: the agent's message at the end of an answer, published by the
core, finds its scope here without asking the database again.
"""

from __future__ import annotations

from typing import NamedTuple
from uuid import UUID

# Conversations remembered per process (~150 bytes each); the least recently told are forgotten first.
KNOWN_SCOPES = 20_000


class Scope(NamedTuple):
    """Who may list a conversation: the admins of `company_id`, and `owner_id`."""

    company_id: UUID
    owner_id: UUID


class Scopes:
    """The scopes of the conversations this process dealt with lately, at most `size`."""

    def __init__(self, size: int = KNOWN_SCOPES) -> None:
        self.size = size
        self._scopes: dict[UUID, Scope] = {}

    def remember(self, conversation_id: UUID, company_id: UUID, owner_id: UUID) -> None:
        scopes = self._scopes
        scopes.pop(conversation_id, None)  # told again: the most recent now
        scopes[conversation_id] = Scope(company_id, owner_id)
        if len(scopes) > self.size:
            del scopes[next(iter(scopes))]

    def get(self, conversation_id: UUID) -> Scope | None:
        return self._scopes.get(conversation_id)

    def forget(self, conversation_id: UUID) -> None:
        self._scopes.pop(conversation_id, None)

    def __len__(self) -> int:
        return len(self._scopes)


# This process's: the chat domain tells it, the core reads it.
known = Scopes()
