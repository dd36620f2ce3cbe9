"""Hostile clients, on raw sockets: request targets that try to reach another server,
injected line breaks, request smuggling, oversized bodies, slow and idle connections.

Already proved elsewhere, not repeated here:
- escapes by request target (`//host:port/`, `http://host/`, `%2F%2F`, `@host`, `..`,
  absolute-form, authority-form, `*`, CONNECT) with a decoy server, and redirects:
  tests/test_paths.py (and the path mapping's properties with hypothesis);
- malformed heads (garbage, a TLS hello, a header without a colon, two different
  Content-Length, NUL in the method): tests/test_forward.py, test_malformed_http_is_400_json;
- a request line over 8 KiB (414), headers over 8 KiB or 64 KiB in all (431), an unfinished
  head over 64 KiB (431): tests/test_forward.py;
- a body over the limit by Content-Length (413 at once) or chunked (413 when crossed):
  tests/test_forward.py;
- header filtering's properties (hypothesis): tests/test_headers.py.
"""

from __future__ import annotations

import asyncio
import itertools
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from aiohttp import web

from proxy.app import Proxy
from proxy.protocol import ConnectionLimits

from .conftest import Connections, fake_upstream, in_process_proxy, run_proxy, write_config
from .test_forward import (
    SAFETY,
    Recorder,
    connect,
    error_type,
    read_response,
    request,
    send,
)

# -- a model server that keeps every byte it is sent ---------------------------------------


class Wire(asyncio.Protocol):
    """One connection to the model server: every byte kept, each request head (bodies are
    not expected) answered 200 "ok"."""

    def __init__(self, received: bytearray, transports: set[asyncio.Transport]) -> None:
        self.received = received
        self.transports = transports
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transports.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.transport is not None
        self.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.received += data
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@asynccontextmanager
async def wire() -> AsyncIterator[tuple[int, bytearray]]:
    """A Wire model server; yields its port and every byte it has received."""
    received = bytearray()
    transports: set[asyncio.Transport] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Wire(received, transports), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        for transport in list(transports):
            transport.close()
        await server.wait_closed()


async def closed_by_proxy(reader: asyncio.StreamReader) -> bytes:
    """What is left to read until the proxy closes (a reset counts as closed)."""
    with suppress(ConnectionResetError):
        async with asyncio.timeout(SAFETY):
            return await reader.read()
    return b""


# -- escaping the model server's origin ----------------------------------------------------


async def test_no_combination_of_escape_tricks_reaches_another_server(tmp_path: Path) -> None:
    """Every combination of the tricks, HTTP and WebSocket upgrade alike: the decoy hears
    nothing, and the model server only ever gets origin-form paths on its own socket."""
    decoy_hits: list[bytes] = []

    async def decoy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoy_hits.append(await reader.read(100))
        writer.close()

    decoy_server = await asyncio.start_server(decoy, "127.0.0.1", 0)
    other = f"127.0.0.1:{decoy_server.sockets[0].getsockname()[1]}"
    prefixes = [
        "/sync/",
        "/sync//",
        "/predict/",
        f"http://{other}/sync/",
        f"HTTP://{other.upper()}/sync/",
        f"ws://{other}/sync/",
        f"http://user@{other}/sync/",
        f"http://{other}@127.0.0.1:1/sync/",
        "//",
    ]
    middles = [
        other,
        f"@{other}",
        f"%2F%2F{other}",
        f"%252F%252F{other}",
        f"\\\\{other}",
        f"%5C%5C{other}",
        f"..%2F..%2F{other}",
        f"../../{other}",
        f"http:%2F%2F{other}",
    ]
    suffixes = ["/x", "", f"?next=http://{other}/"]
    upgrade = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    upstream = Recorder()
    forwarded = 0
    try:
        async with (
            fake_upstream(upstream.app) as port,
            in_process_proxy(tmp_path, port) as (_, url),
        ):
            for prefix, middle, suffix in itertools.product(prefixes, middles, suffixes):
                target = prefix + middle + suffix
                for headers in ([("Host", other), ("X-Forwarded-Host", other)], upgrade):
                    upstream.seen.clear()
                    response = await send(url, request("GET", target, headers))
                    assert response.status in (200, 400, 404), (target, response)
                    for seen in upstream.seen:
                        path = seen["target"].partition("?")[0]
                        assert path.startswith("/"), target
                        assert not path.startswith("//"), target
                    forwarded += len(upstream.seen)
    finally:
        decoy_server.close()
        await decoy_server.wait_closed()
    assert decoy_hits == []
    assert forwarded > 200  # most were forwarded: to the model server, and only there


# -- line breaks and NULs ------------------------------------------------------------------

INJECTIONS = {
    "NUL in a header value": b"GET /sync/x HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "CR in a header value": b"GET /sync/x HTTP/1.1\r\nHost: a\r\nX: a\rY: b\r\n\r\n",
    "LF in a header value": b"GET /sync/x HTTP/1.1\r\nHost: a\r\nX: a\nY: b\r\n\r\n",
    "folded header value": b"GET /sync/x HTTP/1.1\r\nHost: a\r\nX: a\r\n Y: b\r\n\r\n",
    "NUL in a header name": b"GET /sync/x HTTP/1.1\r\nHost: a\r\nX\x00Y: b\r\n\r\n",
    "DEL in a header value": b"GET /sync/x HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
    "space before the colon": b"GET /sync/x HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n",
    "CR in the path": b"GET /sync/x\rY: b HTTP/1.1\r\nHost: a\r\n\r\n",
    "LF in the path": b"GET /sync/x\nY: b HTTP/1.1\r\nHost: a\r\n\r\n",
    "NUL in the path": b"GET /sync/x\x00y HTTP/1.1\r\nHost: a\r\n\r\n",
    "tab in the path": b"GET /sync/x\ty HTTP/1.1\r\nHost: a\r\n\r\n",
    "space in the path": b"GET /sync/x y HTTP/1.1\r\nHost: a\r\n\r\n",
    "bare LF line ends": b"GET /sync/x HTTP/1.1\nHost: a\n\n",
    "bare LF ending the head": b"GET /sync/x HTTP/1.1\r\nHost: a\r\n\n",
    # HTTP/0.9 has no headers: the line after its request line would be a smuggled header
    "LF ending the request line": b"GET /sync/x\nY: b\r\nHost: a\r\n\r\n",
    "HTTP/0.9": b"GET /sync/x\r\n\r\n",
    "HTTP/2.0 in HTTP/1 framing": b"GET /sync/x HTTP/2.0\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("raw", INJECTIONS.values(), ids=INJECTIONS.keys())
async def test_line_breaks_and_nuls_in_heads_are_400_and_never_forwarded(
    tmp_path: Path, raw: bytes
) -> None:
    async with (
        wire() as (port, received),
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
    ):
        async with connect(url) as (reader, writer):
            writer.write(raw)
            response = await read_response(reader)
            assert response.status == 400
            assert error_type(response) == "bad_request"
            assert await closed_by_proxy(reader) == b""
        ok = await send(url, request("GET", "/sync/next"))
        assert (ok.status, ok.body) == (200, b"ok")
        assert received.startswith(b"GET /next HTTP/1.1\r\n")  # and nothing before it


async def test_encoded_line_breaks_reach_the_model_server_still_encoded(tmp_path: Path) -> None:
    async with wire() as (port, received), in_process_proxy(tmp_path, port) as (_, url):
        target = "/sync/x%0d%0aX-Injected:%20yes%00?q=%0d%0aY:%20z"
        response = await send(url, request("GET", target))
        assert response.status == 200
    head = bytes(received).partition(b"\r\n\r\n")[0]
    assert head.startswith(b"GET /x%0d%0aX-Injected:%20yes%00?q=%0d%0aY:%20z HTTP/1.1\r\n")
    assert b"\r\nX-Injected" not in head
    assert b"\r\nY: z" not in head


# -- request smuggling ---------------------------------------------------------------------

SMUGGLED = b"GET /sync/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
SMUGGLING = {
    "CL then TE": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE then CL": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 44\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE then CL 0": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 0\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "same CL twice": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
    b"Content-Length: 2\r\n\r\nab" + SMUGGLED,
    "CL list": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\n\r\nab",
    "CL with a sign": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\nab",
    "CL negative": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nContent-Length: -2\r\n\r\nab",
    "CL overflowing": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nContent-Length: "
    b"99999999999999999999999\r\n\r\nab",
    "TE not ending chunked": b"POST /sync/x HTTP/1.1\r\nHost: a\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE gzip only": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"
    + SMUGGLED,
    "TE xchunked": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n"
    b"0\r\n\r\n" + SMUGGLED,
    "TE identity with CL": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n"
    b"Content-Length: 2\r\n\r\nab",
    "TE twice": b"POST /sync/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE with space before the colon": b"POST /sync/x HTTP/1.1\r\nHost: a\r\n"
    b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "TE with a vertical tab": b"POST /sync/x HTTP/1.1\r\nHost: a\r\n"
    b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("raw", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_ambiguous_body_framing_is_400_and_never_forwarded(
    tmp_path: Path, raw: bytes
) -> None:
    """Two parsers that read a body's length differently let a request hide inside
    another (request smuggling): the proxy refuses every ambiguous framing before anything
    reaches the model server, and closes the connection, so what follows is never read."""
    async with (
        wire() as (port, received),
        in_process_proxy(tmp_path, port) as (proxy, url),
        asyncio.timeout(SAFETY),
    ):
        async with connect(url) as (reader, writer):
            writer.write(raw)
            response = await read_response(reader)
            assert response.status == 400
            assert error_type(response) == "bad_request"
            assert await closed_by_proxy(reader) == b""
        assert received == b""
        assert proxy.metrics.requests == {}  # never routed


CHUNK_ATTACKS = {
    "chunk size overflowing": b"ffffffffffffffffffff\r\nab\r\n0\r\n\r\n",
    "NUL in a chunk extension": b"2;ext=\x00\r\nab\r\n0\r\n\r\n",
    "bare LF chunk lines": b"2\nab\n0\n\n",
    "no CRLF after the chunk": b"2\r\nabXX0\r\n\r\n",
    "chunk size not hex": b"zz\r\nab\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("body", CHUNK_ATTACKS.values(), ids=CHUNK_ATTACKS.keys())
async def test_a_malformed_chunked_body_cuts_the_request(tmp_path: Path, body: bytes) -> None:
    """The head was fine, the body is not: 400, as nothing was answered yet (the case where
    the head went ahead is tests/test_forward.py's); the body is held until whole, so
    nothing of it is forwarded, and the smuggled request after it is never read."""
    head = b"POST /sync/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with (
        wire() as (port, received),
        in_process_proxy(tmp_path, port) as (proxy, url),
        asyncio.timeout(SAFETY),
    ):
        async with connect(url) as (reader, writer):
            writer.write(head + body + SMUGGLED)
            response = await read_response(reader)
            assert response.status == 400
            assert error_type(response) == "bad_request"
            assert await closed_by_proxy(reader) == b""
        assert received == b""
        assert (proxy.limiter.in_flight, proxy.active) == (0, 0)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /sync/" + b"a" * 9000, 414),
        (b"GET /sync/x HTTP/1.1\r\nX-Big: " + b"v" * 9000, 431),
        (b"GET /sync/x HTTP/1.1\r\nBad Header\r\n", 400),
    ],
    ids=["request line", "header", "malformed"],
)
async def test_an_error_answer_reaches_a_client_that_is_still_sending(
    tmp_path: Path, head: bytes, status: int
) -> None:
    """The proxy answers before it has read everything the client sent: closing then
    would reset the connection and the client could lose the answer (nginx's lingering
    close): it half-closes and drops the rest instead."""
    async with (
        in_process_proxy(tmp_path, 1) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        writer.write(head + b"z" * 1_000_000)  # unread by the proxy when it answers
        response = await read_response(reader)
        assert response.status == status
        assert await reader.read() == b""  # then the end, not a reset


async def test_a_huge_chunk_is_413_as_soon_as_the_limit_is_crossed(tmp_path: Path) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port, proxy={"max_request_body_bytes": 1000}) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        # one chunk of 256 MiB announced; 1,001 bytes of it are enough to answer
        writer.write(request("POST", "/sync/up", [("Transfer-Encoding", "chunked")]))
        writer.write(b"10000000\r\n" + b"x" * 1001)
        response = await read_response(reader)
        assert response.status == 413
        assert error_type(response) == "payload_too_large"
        assert upstream.seen == []


# -- slow clients --------------------------------------------------------------------------


def limit(proxy: Proxy, **limits: float) -> Connections:
    """Shorter limits for the connections the proxy accepts from now on; their set."""
    proxy.limits = ConnectionLimits(**limits)
    assert isinstance(proxy.connections, Connections)  # in_process_proxy's
    return proxy.connections


TRICKLE = 0.02  # seconds between two bytes: the slow client's pace, what is under test


async def trickle(
    writer: asyncio.StreamWriter,
    data: bytes,
    stop: asyncio.Event,
    started: asyncio.Event | None = None,
) -> int:
    """Send `data` a byte at a time until `stop`; how many bytes were sent. `started` is
    set once a few bytes are out."""
    for index in range(len(data)):
        if stop.is_set():
            return index
        writer.write(data[index : index + 1])
        if index == 3 and started is not None:
            started.set()
        await asyncio.sleep(TRICKLE)  # ok: the client's pace, not a wait for anything
    return len(data)


async def test_slowloris_heads_time_out_and_do_not_delay_other_clients(tmp_path: Path) -> None:
    upstream = Recorder()
    head = request("GET", "/sync/slow", [("X-Padding", "p" * 200)])  # ~5 s at this pace
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        asyncio.timeout(SAFETY),
    ):
        connections = limit(proxy, header_timeout=1.0)

        async def slowloris(started: asyncio.Event) -> tuple[int, bytes]:
            stop = asyncio.Event()
            async with connect(url) as (reader, writer):
                sending = asyncio.create_task(trickle(writer, head, stop, started))
                answer = await closed_by_proxy(reader)
                stop.set()
                return await sending, answer

        started = [asyncio.Event() for _ in range(50)]
        slow = [asyncio.create_task(slowloris(event)) for event in started]
        await asyncio.gather(*(event.wait() for event in started))
        assert len(connections) == 50
        # a normal client meanwhile: answered while every slow head is still arriving
        response = await send(url, request("GET", "/sync/fast"))
        assert response.status == 200
        assert not any(task.done() for task in slow)
        for sent, answer in await asyncio.gather(*slow):
            assert sent < len(head)  # cut before the head was whole
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
            assert b'"type": "request_timeout"' in answer
        assert upstream.targets == ["/fast"]
        await connections.closed()


async def test_a_stalled_pipelined_head_is_answered_408_after_the_response_before_it(
    tmp_path: Path,
) -> None:
    """A head that stalls behind a stream is answered in its turn: the stream goes on to its
    end untouched (a 408 never lands inside it), then the 408, then the close."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        # the model server's next event comes late, after the second head timed out
        await asyncio.sleep(0.6)  # ok: the model server's pace
        await response.write(b"data: last\n\n")
        return response

    app = web.Application()
    app.router.add_get("/stream", stream)
    async with (
        fake_upstream(app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        asyncio.timeout(SAFETY),
    ):
        limit(proxy, header_timeout=0.3)
        async with connect(url) as (reader, writer):
            writer.write(request("GET", "/sync/stream") + b"GET /sync/next HTTP/1.1\r\nHo")
            received = await closed_by_proxy(reader)
        # the last chunk, after a chunk's CRLF: a header such as Server-Timing's "dur=0.320"
        # followed by the blank line would end in "0\r\n\r\n" too
        first, _, rest = received.partition(b"\r\n0\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 OK\r\n")
        assert first.endswith(b"data: last\n\n")
        assert rest.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert b'"type": "request_timeout"' in rest
        assert proxy.metrics.requests == {("sync", "GET", 200): 1}


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    tmp_path: Path,
) -> None:
    async with in_process_proxy(tmp_path, 1) as (proxy, url), asyncio.timeout(SAFETY):
        connections = limit(proxy, header_timeout=0.2)
        async with connect(url) as (reader, _):
            assert await closed_by_proxy(reader) == b""  # nothing to answer: closed
        await connections.closed()


class SlowBodyUpstream:
    """/upload reads the body to its end; `cancelled` fires if its request is cancelled;
    /gate answers once `gate` is set."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.gated_entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/upload", self.upload)
        self.app.router.add_post("/gate", self.gated)

    async def upload(self, request: web.Request) -> web.Response:
        self.entered.set()
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return web.json_response({"bytes": size})

    async def gated(self, request: web.Request) -> web.Response:
        self.gated_entered.set()
        await self.gate.wait()
        return web.json_response({"gated": True})


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "streamed"])
async def test_a_stalled_body_is_408_and_its_upstream_request_cancelled(
    tmp_path: Path, buffered: bool
) -> None:
    """Held whole first (buffer_request_body_bytes), a stalled body never reaches the model
    server; streamed, its request there is cancelled. Either way the client gets 408."""
    upstream = SlowBodyUpstream()
    settings = {} if buffered else {"buffer_request_body_bytes": 0}
    async with (
        fake_upstream(upstream.app, handler_cancellation=True) as port,
        in_process_proxy(tmp_path, port, proxy=settings) as (proxy, url),
        asyncio.timeout(SAFETY),
    ):
        connections = limit(proxy, body_timeout=0.3)
        async with connect(url) as (reader, writer):
            writer.write(request("POST", "/sync/upload", [("Content-Length", "100")]) + b"x" * 10)
            if not buffered:
                await upstream.entered.wait()  # the head and the first bytes went ahead
            response = await read_response(reader)  # then the body stalls
            assert response.status == 408
            assert error_type(response) == "request_timeout"
            assert response.header("connection") == "close"
            assert await closed_by_proxy(reader) == b""
        if buffered:
            assert not upstream.entered.is_set()
        else:
            await upstream.cancelled.wait()  # the model server saw its request cancelled
        assert proxy.metrics.requests == {("sync", "POST", 408): 1}
        assert (proxy.limiter.in_flight, proxy.active) == (0, 0)
        await connections.closed()


async def test_a_body_trickling_slower_than_the_timeout_in_all_is_not_cut(tmp_path: Path) -> None:
    """The body timeout bounds the pause between two reads, not the whole body."""
    upstream = SlowBodyUpstream()
    body = b"0123456789abcdef" * 2  # 32 bytes at 20 ms: over twice the timeout in all
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        asyncio.timeout(SAFETY),
    ):
        limit(proxy, body_timeout=0.3)
        async with connect(url) as (reader, writer):
            writer.write(request("POST", "/sync/upload", [("Content-Length", str(len(body)))]))
            assert await trickle(writer, body, asyncio.Event()) == len(body)
            response = await read_response(reader)
            assert (response.status, response.json()) == (200, {"bytes": len(body)})


async def test_a_body_the_proxy_holds_back_is_not_timed_out(tmp_path: Path) -> None:
    """Waiting for a slot, the proxy stops reading a large body (backpressure): that pause
    is the proxy's, and the body timeout does not count it."""
    upstream = SlowBodyUpstream()
    body = b"b" * (4 * 1024 * 1024)
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port, predict_concurrency=1) as (proxy, url),
        aiohttp.ClientSession() as session,
        asyncio.timeout(SAFETY),
    ):
        limit(proxy, body_timeout=0.2, header_timeout=0.6)
        gated = asyncio.create_task(session.post(url + "/sync/gate"))
        await upstream.gated_entered.wait()  # it holds the only slot
        async with connect(url) as (reader, writer):
            writer.write(request("POST", "/sync/upload", [("Content-Length", str(len(body)))]))
            writer.write(body)  # more than the proxy buffers: it stops reading
            # a clock without sleeping: a silent connection is closed after header_timeout,
            # three times the body timeout
            async with connect(url) as (clock, _):
                assert await closed_by_proxy(clock) == b""
            upstream.gate.set()
            (await gated).close()
            response = await read_response(reader)
            assert (response.status, response.json()) == (200, {"bytes": len(body)})


# -- idle connections ----------------------------------------------------------------------


async def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(
    tmp_path: Path,
) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        asyncio.timeout(SAFETY),
    ):
        connections = limit(proxy, idle_timeout=0.2)
        async with connect(url) as (reader, writer):
            for _ in range(2):  # kept alive between requests
                writer.write(request("GET", "/sync/x"))
                assert (await read_response(reader)).status == 200
            assert await closed_by_proxy(reader) == b""
        await connections.closed()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


IDLE_CONNECTIONS = 2000


async def test_many_idle_keep_alive_connections_cost_little_memory(tmp_path: Path) -> None:
    """2,000 kept-alive connections, idle after one request each, against the real CLI:
    the proxy's memory grows by well under 50 KiB each (the figure is printed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * IDLE_CONNECTIONS + 200  # both ends here and in the proxy, which inherits it
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} file descriptors (the hard limit is {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        async with run_proxy(write_config(tmp_path)) as proxy:
            for _ in range(50):  # warm up: the first requests allocate what every one reuses
                assert (await send(proxy.url, request("GET", "/health"))).status == 200
            before = rss_kib(proxy.process.pid)
            held: list[asyncio.StreamWriter] = []
            try:

                async def idle() -> None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                    held.append(writer)
                    writer.write(request("GET", "/health"))
                    assert (await read_response(reader)).status == 200

                async with asyncio.timeout(30):
                    await asyncio.gather(*(idle() for _ in range(IDLE_CONNECTIONS)))
                after = rss_kib(proxy.process.pid)
            finally:
                for writer in held:
                    writer.close()
        per_connection = (after - before) / IDLE_CONNECTIONS
        print(
            f"\nRSS {before} KiB -> {after} KiB with {IDLE_CONNECTIONS} idle connections:"
            f" {per_connection:.1f} KiB each"
        )
        assert per_connection < 50
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
