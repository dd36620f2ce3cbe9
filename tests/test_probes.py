"""Tests for proxy.probes: one probe against real loopback peers, and the policy loops on a
fake clock (they run in microseconds, nothing waits for real time to pass)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import grpc
import pytest
from aiohttp import web
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proxy.probes import probe_grpc, probe_http, probe_tcp, wait_until_ready, watch

from .conftest import fake_upstream, free_port

SAFETY = 5  # seconds; a safety net only


def status_app(status: int) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        headers = {"Location": "/ok"} if 300 <= status < 400 else None
        return web.Response(status=status, text="x", headers=headers)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/probe", answer)
    app.router.add_get("/ok", ok)
    return app


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, True), (204, True), (299, True), (301, False), (302, False), (400, False),
     (404, False), (500, False), (503, False)],
)  # fmt: skip
async def test_probe_http_passes_on_2xx_only(status: int, expected: bool) -> None:
    async with fake_upstream(status_app(status)) as port, asyncio.timeout(SAFETY):
        assert await probe_http("127.0.0.1", port, "/probe", 1.0) is expected


async def test_probe_http_fails_on_a_refused_connection() -> None:
    seen: list[str] = []
    async with asyncio.timeout(SAFETY):
        assert await probe_http("127.0.0.1", free_port(), "/health", 1.0, seen.append) is False
    assert seen == ["connection refused"]


async def test_probe_http_fails_when_the_answer_does_not_come_in_time() -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def never(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/health", never)
    async with fake_upstream(app) as port:
        try:
            async with asyncio.timeout(SAFETY):
                assert await probe_http("127.0.0.1", port, "/health", 0.05) is False
            assert arrived.is_set()  # it was the answer that was missing, not the connection
        finally:
            release.set()


async def test_probe_http_fails_when_the_peer_hangs_up_without_answering() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, asyncio.timeout(SAFETY):
        assert await probe_http("127.0.0.1", port, "/health", 1.0) is False


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 2x0 OK\r\n"])
async def test_probe_http_fails_on_an_answer_that_is_not_http(answer: bytes) -> None:
    seen: list[str] = []

    async def speak(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(speak, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, asyncio.timeout(SAFETY):
        assert await probe_http("127.0.0.1", port, "/health", 1.0, seen.append) is False
    assert seen == ["not an HTTP answer"]


async def test_probe_http_reports_the_status_it_saw() -> None:
    seen: list[str] = []
    async with fake_upstream(status_app(503)) as port, asyncio.timeout(SAFETY):
        assert await probe_http("127.0.0.1", port, "/probe", 1.0, seen.append) is False
    assert seen == ["HTTP 503"]


async def test_probe_tcp_passes_while_the_port_accepts() -> None:
    accepted = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, asyncio.timeout(SAFETY):
        assert await probe_tcp("127.0.0.1", port, 1.0) is True
        await accepted.wait()
    async with asyncio.timeout(SAFETY):
        assert await probe_tcp("127.0.0.1", port, 1.0) is False  # closed now


async def test_probe_tcp_fails_on_a_refused_connection() -> None:
    async with asyncio.timeout(SAFETY):
        assert await probe_tcp("127.0.0.1", free_port(), 1.0) is False


class ScriptedProbe:
    """A probe answering from a script; each call moves a fake clock on by one second.
    Once the script is exhausted it blocks until cancelled (and sets `exhausted`)."""

    def __init__(self, results: Iterable[bool]) -> None:
        self.results = list(results)
        self.now = 0.0
        self.calls = 0
        self.exhausted = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def __call__(self) -> bool:
        if self.calls == len(self.results):
            self.exhausted.set()
            await asyncio.Future()  # forever: the test cancels the loop
        self.now += 1.0
        self.calls += 1
        return self.results[self.calls - 1]


T, F = True, False


async def test_wait_until_ready_returns_at_the_first_success() -> None:
    probe = ScriptedProbe([F, F, T, F])
    async with asyncio.timeout(SAFETY):
        ready = await wait_until_ready(probe, interval=0, deadline=10, clock=probe.clock)
    assert ready is True
    assert probe.calls == 3


async def test_wait_until_ready_gives_up_at_the_deadline() -> None:
    probe = ScriptedProbe([F] * 10)
    async with asyncio.timeout(SAFETY):
        ready = await wait_until_ready(probe, interval=0, deadline=3.5, clock=probe.clock)
    assert ready is False
    assert probe.calls == 4  # at 1, 2, 3 there was time left; at 4 there was none


async def test_wait_until_ready_probes_once_even_past_the_deadline() -> None:
    probe = ScriptedProbe([T])
    async with asyncio.timeout(SAFETY):
        assert await wait_until_ready(probe, interval=0, deadline=-1, clock=probe.clock) is True


async def test_wait_until_ready_waits_the_interval_between_probes() -> None:
    probe = ScriptedProbe([F, T])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SAFETY
    async with asyncio.timeout(SAFETY):
        began = loop.time()
        assert await wait_until_ready(probe, interval=0.05, deadline=deadline, clock=loop.time)
    assert loop.time() - began >= 0.04  # it slept between the two probes (uvloop: ms clock)


async def run_watch(probe: ScriptedProbe, threshold: float) -> list[tuple[float, bool]]:
    """Run `watch` over the whole script; the (fake time, value) of each report."""
    reports: list[tuple[float, bool]] = []

    def on_change(ok: bool) -> None:
        reports.append((probe.now, ok))

    task = asyncio.create_task(
        watch(probe, interval=0, threshold=threshold, on_change=on_change, clock=probe.clock)
    )
    try:
        async with asyncio.timeout(SAFETY):
            await probe.exhausted.wait()
        assert not task.done()  # it only ever ends by cancellation
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return reports


async def test_watch_reports_false_only_after_failing_for_the_threshold() -> None:
    probe = ScriptedProbe([T, F, F, F, F, F])
    # failing since t=2: at t=4 for 2 s, at t=5 for 3 s = the threshold
    assert await run_watch(probe, threshold=3) == [(5, False)]


async def test_watch_reports_true_again_at_the_first_success() -> None:
    probe = ScriptedProbe([F, F, F, F, F, T, T, F, T])
    assert await run_watch(probe, threshold=3) == [(4, False), (6, True)]


async def test_watch_restarts_the_threshold_after_any_success() -> None:
    probe = ScriptedProbe([F, F, T, F, F, T, F, F, F, T])
    assert await run_watch(probe, threshold=3) == []


async def test_watch_reports_each_change_once() -> None:
    probe = ScriptedProbe([F, F, F, F, F, F, F, T, T, T, F, F, F, F])
    assert await run_watch(probe, threshold=2) == [(3, False), (8, True), (13, False)]


async def test_watch_with_a_zero_threshold_reports_the_first_failure() -> None:
    probe = ScriptedProbe([T, T, F, T])
    assert await run_watch(probe, threshold=0) == [(3, False), (4, True)]


async def test_watch_says_nothing_while_all_is_well() -> None:
    probe = ScriptedProbe([T] * 20)
    assert await run_watch(probe, threshold=0) == []


# -- the gRPC health check ------------------------------------------------------------------


@asynccontextmanager
async def grpc_server(statuses: dict[str, int] | None) -> AsyncIterator[int]:
    """A grpcio server with the standard health service set to `statuses` (None: without
    any health service, only an unrelated method)."""
    server = aio.server()
    if statuses is None:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("other.Service", {})])
    else:
        servicer = health.aio.HealthServicer()
        for service, status in statuses.items():
            await servicer.set(service, status)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    ("statuses", "service", "ready"),
    [
        ({"": SERVING}, "", True),
        ({"model": SERVING}, "model", True),
        ({"model": NOT_SERVING}, "model", False),
        ({"": SERVING}, "unknown-service", False),  # NOT_FOUND
        (None, "", True),  # UNIMPLEMENTED: it answers, that is all a probe can ask
    ],
)
async def test_probe_grpc_reads_the_health_service(
    statuses: dict[str, int] | None, service: str, ready: bool
) -> None:
    async with grpc_server(statuses) as port:
        assert await probe_grpc("127.0.0.1", port, service, timeout=2) is ready


async def test_probe_grpc_fails_on_a_refused_connection() -> None:
    assert await probe_grpc("127.0.0.1", free_port(), "", timeout=2) is False


async def test_probe_grpc_fails_on_an_http1_server() -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    async with fake_upstream(app) as port:
        assert await probe_grpc("127.0.0.1", port, "", timeout=2) is False


async def test_probe_grpc_fails_when_no_answer_comes_in_time() -> None:
    connected = asyncio.Event()
    hung_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await reader.read()  # reads everything, answers nothing
        hung_up.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert await probe_grpc("127.0.0.1", port, "", timeout=0.2) is False
        assert connected.is_set()
        # the probe hangs up when it gives up, not when its connection's SETTINGS wait (10 s)
        # runs out: a probe every period must not leave a connection behind each time
        async with asyncio.timeout(5):
            await hung_up.wait()
