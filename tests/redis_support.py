"""Redis for tests: a key prefix of the test's own, brokers on it, inspection, cleanup, and a
TCP proxy whose stop/start stands in for a Redis outage without touching the shared server.

`CHATSTREAM_TEST_REDIS` points at the Redis to use (default: the local one). Like the
PostgreSQL server of conftest.py, it is required, not optional: tests that need it fail
rather than skip when it is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aredis

from app.streaming.broker import Broker, InProcessBroker
from app.streaming.redis_broker import RedisBroker

REDIS_URL = os.environ.get("CHATSTREAM_TEST_REDIS", "redis://127.0.0.1:6379")


async def eventually(condition: Callable[[], Awaitable[bool]], within: float = 5.0, what: str = "condition") -> None:
    """Poll `condition` until it holds; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still false after {within} s")
        await asyncio.sleep(0.01)


class RedisScope:
    """One test's share of Redis: every key under `prefix`, every broker made here closed at the end."""

    def __init__(self, url: str = REDIS_URL) -> None:
        self.url = url
        self.prefix = f"chatstream-test-{uuid.uuid4().hex}:"
        self.redis = aredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self._brokers: list[RedisBroker] = []

    def broker(self, url: str | None = None, **options: Any) -> RedisBroker:
        """A broker on this scope's prefix (closed at the end of the scope)."""
        broker = RedisBroker(url or self.url, prefix=self.prefix, **options)
        self._brokers.append(broker)
        return broker

    async def keys(self, containing: str = "") -> list[str]:
        """Every key under the prefix whose name contains `containing`."""
        found = [key.decode() async for key in self.redis.scan_iter(match=f"{self.prefix}*", count=1000)]
        return sorted(key for key in found if containing in key)

    async def clients(self, name_part: str = "") -> list[dict[str, Any]]:
        """CLIENT LIST entries of connections named under the prefix, and containing `name_part`."""
        return [
            c for c in await self.redis.client_list() if c["name"].startswith(self.prefix) and name_part in c["name"]
        ]

    async def kill_clients(self, name_part: str) -> int:
        """CLIENT KILL every connection named under the prefix and containing `name_part`."""
        killed = 0
        for c in await self.clients(name_part):
            killed += int(await self.redis.client_kill_filter(_id=c["id"]))
        return killed

    async def cleanup(self) -> None:
        for broker in self._brokers:
            await broker.close()
        keys = await self.keys()
        if keys:
            await self.redis.unlink(*keys)
        await self.redis.aclose()


@contextlib.asynccontextmanager
async def redis_scope(url: str = REDIS_URL) -> AsyncIterator[RedisScope]:
    """A :class:`RedisScope`, cleaned up (brokers closed, keys deleted) on the way out."""
    scope = RedisScope(url)
    await scope.redis.ping()  # a clear failure here when the test Redis is not running
    try:
        yield scope
    finally:
        await scope.cleanup()


BROKERS = ["in-process", "redis"]


@contextlib.asynccontextmanager
async def any_broker(kind: str, **options: Any) -> AsyncIterator[Broker]:
    """A broker of `kind` (one of BROKERS) with `options` (retain, log_ttl); a Redis one on a
    prefix of its own, its keys deleted on the way out."""
    if kind == "in-process":
        yield InProcessBroker(**options)
        return
    async with redis_scope() as scope:
        yield scope.broker(**options)


class TcpProxy:
    """Forwards a local port to Redis. `stop()` refuses new connections and resets the open ones
    (Redis is down, as far as a broker behind it can tell); `start()` brings it back on the same port."""

    def __init__(self, url: str = REDIS_URL) -> None:
        target = urlsplit(url)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writers.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        # A connection accepted just before stop(), or while Redis is being dialled, must not
        # live on after it: Redis is down for every connection from then on.
        server = self._server
        if server is None:
            client_writer.transport.abort()
            return
        self._writers.add(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        if self._server is not server or client_writer.transport.is_closing():
            client_writer.transport.abort()
            server_writer.transport.abort()
            return
        self._writers.add(server_writer)
        for source, sink in ((client_reader, server_writer), (server_reader, client_writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            sink.transport.abort()
            self._writers.discard(sink)
