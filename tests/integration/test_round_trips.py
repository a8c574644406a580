"""How many database round trips one answer costs, from the POST to `done` (docs/benchmarks.md
keeps the figure): counted by wrapping asyncpg's query methods, on PostgreSQL. A test, so
that a change adding one to every answer is noticed."""

from __future__ import annotations

import asyncpg
import pytest

from app.agents.schemas import AgentCreate
from app.agents.service import create_agent

pytestmark = pytest.mark.anyio

_METHODS = ("execute", "executemany", "fetch", "fetchrow", "fetchval")


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    for name in _METHODS:
        original = getattr(asyncpg.Connection, name)

        def counted(self, query, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(" ".join(str(query).split()))
            return _original(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Connection, name, counted)
    return seen


@pytest.mark.parametrize(("title", "expected"), [("counted", 6), (None, 7)], ids=["titled", "untitled"])
async def test_one_answer_over_sse(app, client, acme, statements, title, expected):
    """POST the message, GET the stream to `done`: 6 round trips with a key this process has
    not seen for a while (1 key lookup; the stream's request finds the key cached): the
    conversation's agent (one statement, which also checks the caller may see the
    conversation), the message with its running answer (one statement, which also tells
    whether the conversation has a title), the history for the agent, the conversation for
    the stream, the end with the answer's message (one statement). A conversation without a
    title costs one more, once: naming it after the message (app/chat/titles.py)."""
    h = acme.headers("alice")
    agent = await create_agent(acme.company_id, AgentCreate(name="echo"))
    body = {"agentId": str(agent.id), "title": title}
    cid = (await client.post("/api/conversations", json=body, headers=h)).json()["id"]
    app.state.principal_cache.forget(acme.principals["alice"].key_id)
    statements.clear()
    r = await client.post(f"/api/conversations/{cid}/messages", json={"content": "one two three"}, headers=h)
    assert r.status_code == 201
    gid = r.json()["generation"]["id"]
    stream = await client.get(f"/api/conversations/{cid}/stream", params={"after": f"{gid}.0"}, headers=h)
    assert "event: done" in stream.text
    assert len(statements) == expected, "\n".join(s[:120] for s in statements)
