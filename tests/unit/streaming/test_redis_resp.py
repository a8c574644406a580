"""The reading loop packs its XREAD itself (app/streaming/redis_broker.py `_resp`): the bytes
must be exactly what redis-py would send."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection

from app.streaming.redis_broker import _resp


@pytest.mark.parametrize(
    "args",
    [
        (b"XREAD", b"BLOCK", b"5000", b"STREAMS", b"chatstream:wake:1", b"0-0"),
        (b"XREAD", b"STREAMS", b"a", b"b\r\nc", b"", b"0-1", b"0-22", b"1700000000000-0"),
        (b"PING",),
    ],
)
def test_resp_is_what_redis_py_sends(args: tuple[bytes, ...]) -> None:
    assert _resp(*args) == b"".join(Connection().pack_command(*args))
