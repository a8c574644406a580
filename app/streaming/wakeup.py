"""Waking the tasks that wait for something new, once per change, at the cost of one future each.

The event log and the Redis broker's watches wake their readers on every token: an
`asyncio.Event` made per wake-up cost more than these futures do.
"""

from __future__ import annotations

import asyncio
import contextlib


class Wakeup:
    """Tasks waiting in :meth:`wait` until the next :meth:`wake`."""

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []

    def __len__(self) -> int:
        """How many tasks wait."""
        return len(self._futures)

    async def wait(self) -> None:
        """Return at the next :meth:`wake`."""
        future = asyncio.get_running_loop().create_future()
        self._futures.append(future)
        try:
            await future
        except asyncio.CancelledError:  # the waiter left: a quiet source must not keep its future
            with contextlib.suppress(ValueError):
                self._futures.remove(future)
            raise

    def wake(self) -> None:
        """Wake every task waiting now."""
        futures, self._futures = self._futures, []
        for future in futures:
            if not future.done():
                future.set_result(None)
