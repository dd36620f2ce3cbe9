"""The limiter on its own: slots, the FIFO queue, its bound and its timeout, cancellation.

Timing-free: asyncio runs ready callbacks in the order they were scheduled, so `started()`
returns once each new task has run up to its first wait (for a waiter: queued).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.errors import QueueFull, QueueTimeout
from proxy.limiter import Limiter

from .conftest import fake_upstream, in_process_proxy
from .test_metrics import metric_becomes, scrape


async def started(*coroutines: Coroutine[Any, Any, None]) -> list[asyncio.Task[None]]:
    """Tasks for `coroutines`, returned once each has run its first step: the callback
    scheduled after their first steps can only run after them."""
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(coroutine) for coroutine in coroutines]
    turn = loop.create_future()
    loop.call_soon(turn.set_result, None)
    await turn
    return tasks


def limiter(concurrency: int = 1, queue: int = 10, timeout: float | None = None) -> Limiter:
    return Limiter(max_concurrency=concurrency, max_queue=queue, queue_timeout=timeout)


async def test_slots_are_taken_without_waiting_until_none_is_left() -> None:
    slots = limiter(concurrency=2)
    await slots.acquire()
    assert slots.try_acquire()
    assert slots.in_flight == 2
    assert not slots.try_acquire()
    [waiter] = await started(slots.acquire())
    assert (slots.in_flight, slots.queued) == (2, 1)
    assert not waiter.done()
    slots.release()  # the slot passes to the waiter: in_flight stays
    await waiter
    assert (slots.in_flight, slots.queued) == (2, 0)
    slots.release()
    slots.release()
    assert (slots.in_flight, slots.queued) == (0, 0)


async def test_waiters_get_slots_in_arrival_order() -> None:
    slots = limiter(concurrency=1)
    assert slots.try_acquire()
    order: list[str] = []

    async def wait(name: str) -> None:
        await slots.acquire()
        order.append(name)

    tasks = await started(wait("a"), wait("b"), wait("c"))
    assert slots.queued == 3
    # a newcomer may not overtake the queue, even at the moment a slot frees
    slots.release()
    assert not slots.try_acquire()
    for expected, task in zip("abc", tasks, strict=True):
        await task
        assert order[-1] == expected
        assert slots.in_flight == 1
        slots.release()
    assert order == ["a", "b", "c"]
    assert (slots.in_flight, slots.queued) == (0, 0)


async def test_queue_full_is_raised_at_once_beyond_max_queue() -> None:
    slots = limiter(concurrency=1, queue=2)
    assert slots.try_acquire()
    waiters = await started(slots.acquire(), slots.acquire())
    assert slots.queued == 2
    with pytest.raises(QueueFull):
        await slots.acquire()  # no slot is ever released: only an immediate error ends this
    assert (slots.in_flight, slots.queued) == (1, 2)
    for waiter in waiters:
        slots.release()  # each release hands the one slot to the next waiter
        await waiter
    assert (slots.in_flight, slots.queued) == (1, 0)
    slots.release()
    assert slots.in_flight == 0


async def test_max_queue_zero_means_no_waiting() -> None:
    slots = limiter(concurrency=1, queue=0)
    await slots.acquire()
    with pytest.raises(QueueFull):
        await slots.acquire()
    slots.release()
    await slots.acquire()  # a free slot is still taken at once
    slots.release()
    assert (slots.in_flight, slots.queued) == (0, 0)


async def test_queue_timeout_gives_up_and_leaves_the_queue() -> None:
    slots = limiter(concurrency=1, timeout=0.01)
    assert slots.try_acquire()
    with pytest.raises(QueueTimeout):
        await slots.acquire()
    assert (slots.in_flight, slots.queued) == (1, 0)
    slots.release()
    assert slots.in_flight == 0


async def test_a_cancelled_waiter_leaves_the_queue_at_once() -> None:
    slots = limiter(concurrency=1)
    assert slots.try_acquire()
    first, second = await started(slots.acquire(), slots.acquire())
    assert slots.queued == 2
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert slots.queued == 1
    slots.release()  # goes to the one still waiting, not to the cancelled one
    await second
    assert (slots.in_flight, slots.queued) == (1, 0)
    slots.release()
    assert slots.in_flight == 0


async def test_a_slot_handed_to_a_waiter_being_cancelled_is_passed_on() -> None:
    slots = limiter(concurrency=1)
    assert slots.try_acquire()
    first, second = await started(slots.acquire(), slots.acquire())
    slots.release()  # the slot is handed to `first`...
    first.cancel()  # ...which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await first
    await second  # the slot was passed on, not lost
    assert (slots.in_flight, slots.queued) == (1, 0)
    slots.release()
    assert slots.in_flight == 0


async def test_a_slot_handed_to_a_cancelled_last_waiter_is_returned() -> None:
    slots = limiter(concurrency=1)
    assert slots.try_acquire()
    [waiter] = await started(slots.acquire())
    slots.release()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (slots.in_flight, slots.queued) == (0, 0)
    assert slots.try_acquire()


async def test_a_slot_handed_over_as_the_queue_timeout_fires_is_not_lost() -> None:
    slots = limiter(concurrency=1, timeout=0)
    assert slots.try_acquire()
    loop = asyncio.get_running_loop()
    # In order: the waiter queues (and its zero timeout schedules itself next), the slot
    # is handed to it, then the timeout fires before the waiter could wake up.
    waiter = loop.create_task(slots.acquire())
    loop.call_soon(slots.release)
    await waiter  # the slot had arrived: the waiter keeps it rather than leak it
    assert (slots.in_flight, slots.queued) == (1, 0)
    slots.release()
    assert slots.in_flight == 0


# -- through the proxy -----------------------------------------------------------------


class GatedUpstream:
    """A model server whose requests wait on `gate`; `running` fires once `expect` of
    them have arrived."""

    def __init__(self, expect: int) -> None:
        self.gate = asyncio.Event()
        self.running = asyncio.Event()
        self.expect = expect
        self.seen: list[str] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[int]:
        """Serve on a free port; the gate opens on the way out, so no handler is left."""
        async with fake_upstream(self.app) as port:
            try:
                yield port
            finally:
                self.gate.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/ws":
            return await self.websocket(request)
        self.seen.append(request.query.get("n", ""))
        if len(self.seen) == self.expect:
            self.running.set()
        await self.gate.wait()
        return web.json_response({"n": request.query.get("n", "")})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws


async def call(session: aiohttp.ClientSession, url: str) -> tuple[int, CIMultiDictProxy[str], Any]:
    async with session.post(url, json={}) as response:
        return response.status, response.headers, await response.json()


async def test_saturation_runs_two_queues_two_and_rejects_the_fifth(tmp_path: Path) -> None:
    upstream = GatedUpstream(expect=2)
    async with (
        upstream.serve() as port,
        in_process_proxy(tmp_path, port, predict_concurrency=2, proxy={"max_queue_size": 2}) as (
            proxy,
            url,
        ),
        aiohttp.ClientSession() as session,
    ):
        calls = [asyncio.create_task(call(session, f"{url}/predict?n={i}")) for i in range(5)]
        async with asyncio.timeout(5):
            done, waiting = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
            await upstream.running.wait()
        [rejected] = done  # the others cannot end before the gate opens
        status, headers, body = rejected.result()
        assert status == 503
        assert body["error"]["type"] == "queue_full"
        assert headers["Retry-After"] == "1"
        # the proxy's own endpoints never wait, even now
        for path in ("/health", "/ready"):
            async with session.get(url + path) as response:
                assert response.status == 200
        samples = await scrape(session, url)
        assert samples["model_proxy_requests_in_flight"] == 2.0
        assert samples["model_proxy_requests_queued"] == 2.0
        assert len(upstream.seen) == 2

        upstream.gate.set()
        async with asyncio.timeout(5):
            results = await asyncio.gather(*waiting)
        assert [status for status, _, _ in results] == [200] * 4
        assert sorted(upstream.seen) == sorted(body["n"] for _, _, body in results)
        assert (proxy.limiter.in_flight, proxy.limiter.queued) == (0, 0)


async def test_queue_timeout_answers_503_to_the_waiter(tmp_path: Path) -> None:
    upstream = GatedUpstream(expect=1)
    async with (
        upstream.serve() as port,
        in_process_proxy(
            tmp_path, port, predict_concurrency=1, proxy={"queue_timeout_seconds": 0.2}
        ) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        first = asyncio.create_task(call(session, f"{url}/predict?n=first"))
        async with asyncio.timeout(5):
            await upstream.running.wait()
            status, headers, body = await call(session, f"{url}/sync/x?n=second")
        assert status == 503
        assert body["error"]["type"] == "queue_timeout"
        assert headers["Retry-After"] == "1"
        assert proxy.limiter.queued == 0
        upstream.gate.set()
        async with asyncio.timeout(5):
            assert (await first)[0] == 200
        assert upstream.seen == ["first"]


async def test_a_client_that_leaves_while_queued_leaves_the_queue(tmp_path: Path) -> None:
    upstream = GatedUpstream(expect=1)
    async with (
        upstream.serve() as port,
        in_process_proxy(tmp_path, port, predict_concurrency=1, proxy={"max_queue_size": 1}) as (
            proxy,
            url,
        ),
        aiohttp.ClientSession() as session,
    ):
        first = asyncio.create_task(call(session, f"{url}/predict?n=first"))
        async with asyncio.timeout(5):
            await upstream.running.wait()
        leaving = asyncio.create_task(call(session, f"{url}/predict?n=leaving"))
        await metric_becomes(session, url, "model_proxy_requests_queued", 1.0)
        leaving.cancel()  # the client closes its connection
        await metric_becomes(session, url, "model_proxy_requests_queued", 0.0)
        # its place is free: the next request queues instead of being turned away
        third = asyncio.create_task(call(session, f"{url}/predict?n=third"))
        await metric_becomes(session, url, "model_proxy_requests_queued", 1.0)
        upstream.gate.set()
        async with asyncio.timeout(5):
            assert (await first)[0] == 200
            assert (await third)[0] == 200
        assert upstream.seen == ["first", "third"]
        samples = await scrape(session, url)
        assert samples['model_proxy_requests_total{code="499",method="POST",route="predict"}'] == 1
        assert (proxy.limiter.in_flight, proxy.limiter.queued) == (0, 0)


async def test_an_open_websocket_holds_a_slot_until_it_closes(tmp_path: Path) -> None:
    upstream = GatedUpstream(expect=1)
    upstream.gate.set()
    async with (
        upstream.serve() as port,
        in_process_proxy(tmp_path, port, predict_concurrency=1) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(url + "/sync/ws") as ws:
            await ws.send_str("hello")
            assert await ws.receive_str() == "hello"
            request = asyncio.create_task(call(session, f"{url}/predict?n=after"))
            await metric_becomes(session, url, "model_proxy_requests_queued", 1.0)
            assert upstream.seen == []
            assert not request.done()
        async with asyncio.timeout(5):
            assert (await request)[0] == 200
        assert upstream.seen == ["after"]
        assert (proxy.limiter.in_flight, proxy.limiter.queued) == (0, 0)
