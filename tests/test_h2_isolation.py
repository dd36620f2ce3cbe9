"""One client's bad request is that client's problem: the proxy resets it before it reaches
the model server, whose connection the calls of every client share and which a strict
server (h2 here, as the RFC allows it) would close over a single malformed request. And a
stream that ends any which way lets go of its call, its slot and its place on the
connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from proxy.app import Proxy
from proxy.h2frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADER_TABLE_SIZE,
    HEADERS,
    RST_STREAM,
    SETTING,
    SETTINGS,
    STREAM_CLOSED,
    frame,
)
from proxy.hpack_codec import encode

from .h2peers import H2Client, H2Upstream, UpstreamStream, grpc_frame, grpc_request
from .test_grpc import grpc_proxy, port_of
from .test_h2conn import RawPeer

SAFETY = 5.0
PROTOCOL_ERROR = 0x1
OK = [(b":status", b"200"), (b"content-type", b"application/grpc")]
PROTOCOL = (b":protocol", b"websocket")  # extended CONNECT's (RFC 8441)


@asynccontextmanager
async def shared(tmp_path: Path) -> AsyncIterator[tuple[Proxy, H2Upstream, int, UpstreamStream]]:
    """A strict model server, the proxy, and a call of another client open on the proxy's
    connection to the model server: the one a bad request would break."""
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port) as (proxy, url),
    ):
        port = port_of(url)
        bystander = await H2Client.connect(port)
        stream_id = bystander.request(grpc_request(port, b"/a.B/Bystander"), end=False)
        call = await upstream.next_stream()
        yield proxy, upstream, port, call
        # the bystander's call goes on as if nothing happened
        await bystander.send_all(stream_id, grpc_frame(b"still here"), end=True)
        async with asyncio.timeout(SAFETY):
            await call.ended.wait()
        call.respond(OK)
        await call.send(grpc_frame(b"fine"))
        call.trailers([(b"grpc-status", b"0")])
        reply = await bystander.reply(stream_id)
        assert reply.trailer(b"grpc-status") == b"0"
        assert bytes(call.data) == grpc_frame(b"still here")
        assert bytes(reply.data) == grpc_frame(b"fine")
        assert upstream.arrived.empty()  # the bad request never reached the model server
        assert len(upstream.connections) == 1
        await bystander.close()


async def reset_code(peer: RawPeer, stream_id: int = 1) -> int:
    return int.from_bytes(await peer.wait_for(RST_STREAM, stream_id), "big")


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([(b"", b"x")], id="empty-name"),
        pytest.param([(b"x-a", b"one\r\nx-b: two")], id="crlf-in-value"),
        pytest.param([(b"x-a", b"nul\x00")], id="nul-in-value"),
        pytest.param([(b"x-a", b" padded")], id="leading-space"),
        pytest.param([(b"x-a", b"padded\t")], id="trailing-tab"),
        pytest.param([(b"x a", b"1")], id="space-in-name"),
        pytest.param([(b"x:a", b"1")], id="colon-in-name"),
        pytest.param([(b"x-\xc3\xa9", b"1")], id="non-ascii-name"),
        pytest.param([(b"X-Upper", b"1")], id="upper-case-name"),
        pytest.param([(b"host", b"elsewhere")], id="host-not-authority"),
        pytest.param([(b"host", b"a"), (b"host", b"b")], id="two-hosts"),
        pytest.param([(b"content-length", b"-1")], id="bad-content-length"),
        pytest.param([(b"content-length", b"1"), (b"content-length", b"2")], id="two-lengths"),
        pytest.param([(b"keep-alive", b"1")], id="connection-specific"),
        pytest.param([(b"te", b"trailers, gzip")], id="te-not-trailers"),
    ],
)
async def test_malformed_request_headers_never_reach_the_model_server(
    tmp_path: Path, extra: list[tuple[bytes, bytes]]
) -> None:
    async with shared(tmp_path) as (_, _, port, _):
        peer = await RawPeer.connect(port)
        block = encode(grpc_request(port, b"/a.B/C") + extra)
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
        assert await reset_code(peer) == PROTOCOL_ERROR
        await peer.close()


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"")], id="empty"),
        pytest.param(
            [(b":method", b"CONNECT"), (b":scheme", b"http"), (b":path", b"/a.B/C")], id="connect"
        ),
        pytest.param(
            [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C"), PROTOCOL],
            id="extended-connect",
        ),
    ],
)
async def test_malformed_pseudo_headers_never_reach_the_model_server(
    tmp_path: Path, headers: list[tuple[bytes, bytes]]
) -> None:
    async with shared(tmp_path) as (_, _, port, _):
        peer = await RawPeer.connect(port)
        block = encode([*headers, (b"content-type", b"application/grpc")])
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
        assert await reset_code(peer) == PROTOCOL_ERROR
        await peer.close()


@pytest.mark.parametrize(("length", "body"), [(b"3", b"12345"), (b"9", b"12345")])
async def test_a_body_that_breaks_its_content_length_is_stopped(
    tmp_path: Path, length: bytes, body: bytes
) -> None:
    """The proxy passes the body on as it comes, so the call reached the model server; its
    excess, or its early end, must not: the model server sees a cancel instead."""
    async with shared(tmp_path) as (_, upstream, port, _):
        peer = await RawPeer.connect(port)
        block = encode(grpc_request(port, b"/a.B/C", (b"content-length", length)))
        peer.send(frame(HEADERS, END_HEADERS, 1, block))
        call = await upstream.next_stream()
        peer.send(frame(DATA, END_STREAM, 1, body))
        assert await reset_code(peer) == PROTOCOL_ERROR
        async with asyncio.timeout(SAFETY):
            await call.reset.wait()
        assert len(call.data) <= int(length)
        assert not call.ended.is_set()
        await peer.close()


async def test_request_trailers_pass_and_malformed_ones_are_stopped(tmp_path: Path) -> None:
    async with shared(tmp_path) as (_, upstream, port, _):
        client = await H2Client.connect(port)
        stream_id = client.request(grpc_request(port, b"/a.B/C"), end=False)
        client.conn.send_headers(stream_id, [(b"x-checksum", b"abc")], end_stream=True)
        client.flush()
        call = await upstream.next_stream()
        async with asyncio.timeout(SAFETY):
            await call.ended.wait()
        assert call.request_trailers == [(b"x-checksum", b"abc")]
        call.respond([*OK, (b"grpc-status", b"0")], end=True)
        await client.reply(stream_id)
        await client.close()

        peer = await RawPeer.connect(port)  # h2 will not send malformed trailers itself
        peer.send(frame(HEADERS, END_HEADERS, 1, encode(grpc_request(port, b"/a.B/C"))))
        bad = await upstream.next_stream()
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, encode([(b":path", b"/x")])))
        assert await reset_code(peer) == PROTOCOL_ERROR
        async with asyncio.timeout(SAFETY):
            await bad.reset.wait()
        assert not bad.ended.is_set()
        await peer.close()


async def test_data_on_a_half_closed_stream_cancels_the_call(tmp_path: Path) -> None:
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port) as (proxy, url),
    ):
        peer = await RawPeer.connect(port_of(url))
        block = encode(grpc_request(port_of(url), b"/a.B/C"))
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
        call = await upstream.next_stream()
        peer.send(frame(DATA, 0, 1, b"after the end"))
        assert await reset_code(peer) == STREAM_CLOSED
        async with asyncio.timeout(SAFETY):
            await call.reset.wait()  # cancelled at the model server, slot freed
            await proxy.idle.wait()
        assert proxy.limiter.in_flight == 0
        await peer.close()


async def test_a_stream_the_model_server_resets_leaves_the_connection(tmp_path: Path) -> None:
    """The client's connection forgets the stream: it goes idle (and later away) as usual."""
    idle_soon = {"keepalive_timeout_seconds": 0.2}
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, proxy=idle_soon) as (proxy, url),
    ):
        client = await H2Client.connect(port_of(url))
        stream_id = client.request(grpc_request(port_of(url), b"/a.B/C"), end=False)
        call = await upstream.next_stream()
        call.peer.conn.reset_stream(call.stream_id, 0x2)
        call.peer.flush()
        assert (await client.reply(stream_id)).reset_code == 0x2
        [connection] = proxy.h2_connections
        assert connection.active_streams == 0
        async with asyncio.timeout(SAFETY):
            await client.got_goaway.wait()  # idle, then GOAWAY: nothing held it open
        await client.close()


def data_before_headers(call: UpstreamStream) -> None:
    call.peer.writer.write(frame(DATA, 0, call.stream_id, b"no headers first"))


def pseudo_headers_in_trailers(call: UpstreamStream) -> None:
    call.respond(OK)
    block = encode([(b":status", b"200"), (b"grpc-status", b"0")])
    call.peer.writer.write(frame(HEADERS, END_HEADERS | END_STREAM, call.stream_id, block))


@pytest.mark.parametrize("misbehave", [data_before_headers, pseudo_headers_in_trailers])
async def test_a_malformed_response_resets_only_that_call(
    tmp_path: Path, misbehave: Callable[[UpstreamStream], None]
) -> None:
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port) as (_, url),
    ):
        client = await H2Client.connect(port_of(url))
        broken = client.request(grpc_request(port_of(url), b"/a.B/Broken"), grpc_frame(b""))
        misbehave(await upstream.next_stream())
        reply = await client.reply(broken)
        assert reply.reset_code == PROTOCOL_ERROR
        assert reply.trailers is None
        if misbehave is data_before_headers:
            assert reply.headers is None
        # the client's connection is fine, and so is the proxy's to the model server
        after = client.request(grpc_request(port_of(url), b"/a.B/After"), grpc_frame(b""))
        next_call = await upstream.next_stream()
        next_call.respond([*OK, (b"grpc-status", b"0")], end=True)
        assert (await client.reply(after)).header(b"grpc-status") == b"0"
        assert client.goaway is None
        await client.close()


async def test_a_smaller_header_table_is_acknowledged_in_the_next_block(tmp_path: Path) -> None:
    """A client that shrinks its HPACK table (nghttp2's, curl's: --header-table-size 0) waits
    for the encoder to say it follows, at the start of the next header block (RFC 7541 §4.2);
    without it nghttp2 ends the connection with COMPRESSION_ERROR."""
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port) as (_, url),
    ):
        peer = await RawPeer.connect(port_of(url))
        peer.send(frame(SETTINGS, 0, 0, SETTING.pack(HEADER_TABLE_SIZE, 0)))
        block = encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/health")])
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
        answer = await peer.wait_for(HEADERS, 1)
        assert answer[0] == 0x20  # a dynamic table size update to 0, first
        await peer.close()


async def test_a_burst_past_the_model_servers_stream_limit_opens_more_connections(
    tmp_path: Path,
) -> None:
    """h2, as model server, takes 100 streams a connection and ends the whole connection
    when a client opens more (the RFC allows it). 250 calls at once, before the proxy has
    heard its SETTINGS and after: each connection gets no more than its limit."""
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, concurrency=500) as (proxy, url),
    ):
        client = await H2Client.connect(port_of(url))
        first = [client.request(grpc_request(port_of(url), b"/a.B/C")) for _ in range(250)]
        calls = [await upstream.next_stream() for _ in range(250)]
        then = [client.request(grpc_request(port_of(url), b"/a.B/C")) for _ in range(150)]
        calls += [await upstream.next_stream() for _ in range(150)]
        for call in calls:
            call.respond([*OK, (b"grpc-status", b"0")], end=True)
        for stream_id in first + then:
            assert (await client.reply(stream_id)).header(b"grpc-status") == b"0"
        await client.close()
        assert proxy.grpc_upstream is not None
        assert len(upstream.connections) >= 4
        for connection in upstream.connections:
            assert not connection.closed.is_set()  # none was ended for too many streams
