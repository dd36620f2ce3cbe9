"""Concurrency slots with a bounded FIFO queue and a queue timeout."""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import QueueFull, QueueTimeout


class Limiter:
    """`max_concurrency` requests run at once; up to `max_queue` more wait in arrival
    order, each at most `queue_timeout` seconds. A freed slot passes straight to the
    oldest waiter, so a newcomer can never overtake the queue."""

    def __init__(
        self, *, max_concurrency: int, max_queue: int, queue_timeout: float | None
    ) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.in_flight < self.max_concurrency and not self._waiters:
            self.in_flight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a slot; QueueFull at once when the queue is full, QueueTimeout when
        the wait is too long. A cancelled waiter leaves the queue at once."""
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_queue:
            raise QueueFull()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot arrived just as the timeout fired: keep it, never leak it
            raise QueueTimeout() from None
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived as we were cancelled: pass it on
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; in_flight stays
                return
        self.in_flight -= 1
