"""Pipelining and the smaller findings of issue 9, on raw sockets: however many requests
arrive in one read they are answered in order; the proxy's own answers wait while the
client reads nothing; a valid request followed by garbage is answered first; Host and
X-Request-ID are checked."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric

from proxy.protocol import WRITE_HIGH_WATER

from .conftest import fake_upstream, in_process_proxy
from .test_forward import Recorder, connect, error_type, read_response, request, send

SAFETY = 10.0


async def test_five_thousand_pipelined_requests_in_one_read_are_all_answered(
    tmp_path: Path,
) -> None:
    """The head limit counts one head at a time, not the read they arrived in."""
    count = 5000
    async with (
        in_process_proxy(tmp_path, 1) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        writer.write(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n" * count)
        for _ in range(count):
            assert (await read_response(reader)).status == 200


async def test_a_forwarded_request_pipelined_with_local_ones_is_answered_in_order(
    tmp_path: Path,
) -> None:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        forwarded = request("GET", "/sync/a")
        local = request("GET", "/health")
        writer.write((local + forwarded + local + local + forwarded + local) * 20)
        statuses = []
        for _ in range(120):
            response = await read_response(reader)
            statuses.append((response.status, "target" in response.json()))
        forwarded_ones = [False, True, False, False, True, False] * 20
        assert statuses == [(200, is_forwarded) for is_forwarded in forwarded_ones]
    assert errors == []  # no traceback (issue 9: IndexError in response_done)


async def test_local_answers_wait_while_the_client_reads_nothing(tmp_path: Path) -> None:
    """Pipelined /metrics, unread: each answer is rendered only when the client's socket
    takes more (issue 9: RSS grew by 100 MB); read at last, all are there, in order."""
    count = 3000
    buffered: list[int] = []
    async with (
        in_process_proxy(tmp_path, 1) as (proxy, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):

        class Watcher:
            """Renders with the proxy's families: notes the client's unsent bytes then."""

            def describe(self) -> list[Metric]:
                return []

            def collect(self) -> list[Metric]:
                (connection,) = proxy.connections
                assert connection.transport is not None
                buffered.append(connection.transport.get_write_buffer_size())
                return []

        proxy.metrics.registry.register(Watcher())
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n" * count)
        await writer.drain()
        for _ in range(count):
            response = await read_response(reader)
            assert response.status == 200
            assert b"model_proxy_requests_total" in response.body
    assert len(buffered) == count
    answer = len(response.body) + 200
    assert max(buffered) <= WRITE_HIGH_WATER + answer


async def test_a_valid_request_followed_by_garbage_is_answered_before_the_400(
    tmp_path: Path,
) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        writer.write(request("POST", "/sync/ok", body=b"abc") + b"\x00\x01 not http\r\n\r\n")
        first = await read_response(reader)
        assert (first.status, first.json()["target"]) == (200, "/ok")
        second = await read_response(reader)
        assert second.status == 400
        assert error_type(second) == "bad_request"
        assert second.header("connection") == "close"
        assert await reader.read() == b""


@pytest.mark.parametrize(
    "hosts", [[], [b"a", b"b"], [b"a", b"a"]], ids=["missing", "two", "the same twice"]
)
async def test_an_http_1_1_request_needs_exactly_one_host(
    tmp_path: Path, hosts: list[bytes]
) -> None:
    upstream = Recorder()
    lines = b"".join(b"Host: " + host + b"\r\n" for host in hosts)
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        response = await send(url, b"GET /sync/x HTTP/1.1\r\n" + lines + b"\r\n")
    assert response.status == 400
    assert error_type(response) == "bad_request"
    assert upstream.seen == []


async def test_an_http_1_0_request_may_go_without_host(tmp_path: Path) -> None:
    """The model server is spoken to in HTTP/1.1: it gets its own address as Host."""
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        response = await send(url, b"GET /sync/x HTTP/1.0\r\n\r\n")
    assert response.status == 200
    (seen,) = upstream.seen
    assert ["Host", f"127.0.0.1:{port}"] in seen["headers"]


async def test_connection_cannot_remove_host(tmp_path: Path) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        raw = request("GET", "/sync/x", [("Host", "model.test"), ("Connection", "close, Host")])
        response = await send(url, raw)
    assert response.status == 200
    (seen,) = upstream.seen
    assert ["Host", "model.test"] in seen["headers"]


@pytest.mark.parametrize(
    "request_id",
    ["x" * 201, "tab\there", "caf\u00e9"],
    ids=["too long", "tab", "not ascii"],
)
async def test_an_unusable_x_request_id_is_replaced_both_ways(
    tmp_path: Path, request_id: str
) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
    ):
        raw = request("GET", "/sync/x", [("X-Request-ID", "PLACEHOLDER")])
        raw = raw.replace(b"PLACEHOLDER", request_id.encode())
        forwarded = await send(url, raw)
        proxy.state.enter("starting", None)
        refused = await send(url, raw)
    (seen,) = upstream.seen
    sent = [value for name, value in seen["headers"] if name == "X-Request-ID"]
    assert sent == [forwarded.header("x-request-id")]
    for response in (forwarded, refused):
        assert re.fullmatch(r"[0-9a-f]{32}", response.header("x-request-id") or "")
    assert refused.status == 503


async def test_a_printable_x_request_id_of_200_bytes_is_kept(tmp_path: Path) -> None:
    upstream = Recorder()
    chosen = "id-" + "~" * 197
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        response = await send(url, request("GET", "/sync/x", [("X-Request-ID", chosen)]))
    assert response.header("x-request-id") == chosen
