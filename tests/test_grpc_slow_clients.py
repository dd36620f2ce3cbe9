"""Clients that stop reading, and clients that leave, over HTTP/2: a stream whose client
leaves its window shut for `client_send_timeout_seconds` is reset and its call cancelled, a
connection whose socket takes nothing that long is closed, and every cancel is counted in
`model_proxy_client_disconnects_total` by how far its call had come."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from proxy.h2frames import (
    END_HEADERS,
    END_STREAM,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_WINDOW,
    PREFACE,
    SETTING,
    SETTINGS,
    WINDOW_UPDATE,
    WORD,
    frame,
)
from proxy.hpack_codec import encode

from .h2peers import H2Client, H2Upstream, grpc_frame, grpc_request
from .test_grpc import grpc_proxy, port_of

SAFETY = 10.0
CANCEL = 0x8
OK = [(b":status", b"200"), (b"content-type", b"application/grpc")]
SEND_TIMEOUT = {"client_send_timeout_seconds": 0.3}


async def test_a_stream_left_unread_is_reset_and_its_call_cancelled(tmp_path: Path) -> None:
    """The client takes 1 KiB and hands no window back: after the send timeout its stream is
    reset, the model server's call cancelled, the slot freed; the connection goes on."""
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, proxy=SEND_TIMEOUT) as (proxy, url),
    ):
        client = await H2Client.connect(port_of(url), auto_ack=False, window=1024)
        stream_id = client.request(grpc_request(port_of(url), b"/s.S/Stream"), grpc_frame(b""))
        call = await upstream.next_stream()
        call.respond(OK)
        sending = asyncio.create_task(call.send(b"z" * 100_000))
        reply = await client.reply(stream_id)
        assert reply.reset_code == CANCEL
        assert len(reply.data) <= 1024
        async with asyncio.timeout(SAFETY):
            await call.reset.wait()
            await proxy.idle.wait()
        assert call.reset_code == CANCEL
        assert proxy.limiter.in_flight == 0
        sending.cancel()
        await client.ping()  # the connection itself is fine
        assert client.goaway is None
        await client.close()
    assert proxy.metrics.client_disconnects == {"queued": 0, "waiting": 0, "streaming": 1}
    assert proxy.metrics.grpc_requests["CANCELLED"] == 1


async def test_a_shut_connection_window_cuts_the_streams_waiting_on_it(tmp_path: Path) -> None:
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, proxy=SEND_TIMEOUT) as (proxy, url),
    ):
        # a large stream window, but the connection's 65,535 bytes are never handed back
        client = await H2Client.connect(port_of(url), auto_ack=False, window=MAX_WINDOW)
        stream_id = client.request(grpc_request(port_of(url), b"/s.S/Stream"), grpc_frame(b""))
        call = await upstream.next_stream()
        call.respond(OK)
        sending = asyncio.create_task(call.send(b"x" * 200_000))
        async with asyncio.timeout(SAFETY):
            await call.reset.wait()
        assert call.reset_code == CANCEL
        assert (await client.reply(stream_id)).reset_code == CANCEL
        sending.cancel()
        async with asyncio.timeout(SAFETY):
            await proxy.idle.wait()
        await client.close()


async def test_a_slow_reader_that_keeps_reading_is_not_cut(tmp_path: Path) -> None:
    """Each window the client hands back restarts the clock: a reader slower than the model
    server, but never stalled for the whole send timeout, gets its whole answer."""
    payload = b"y" * 64 * 1024
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, proxy={"client_send_timeout_seconds": 1}) as (
            proxy,
            url,
        ),
    ):
        client = await H2Client.connect(port_of(url), auto_ack=False, window=4096)
        stream_id = client.request(grpc_request(port_of(url), b"/s.S/Stream"), grpc_frame(b""))
        call = await upstream.next_stream()
        call.respond(OK)
        sending = asyncio.create_task(call.send(payload))
        reply = client.replies[stream_id]
        async with asyncio.timeout(SAFETY):
            while len(reply.data) < len(payload):
                await asyncio.sleep(0.1)  # ok: a slow reader's pace, 16 windows in 1.6 s
                client.ack(stream_id)
        await sending
        call.trailers([(b"grpc-status", b"0")])
        reply = await client.reply(stream_id)
        await client.close()
    assert reply.reset_code is None
    assert bytes(reply.data) == payload
    assert proxy.metrics.client_disconnects["streaming"] == 0


async def test_a_socket_that_takes_nothing_is_closed(tmp_path: Path) -> None:
    """Windows wide open, but the client never reads its socket: once the proxy's buffer is
    full and stays so for the send timeout, the connection is closed and its call cancelled
    (the proxy stops reading the client meanwhile, so nothing piles up)."""
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, proxy=SEND_TIMEOUT) as (proxy, url),
    ):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast
        reader, writer = await asyncio.open_connection(sock=_connected(sock, port_of(url)))
        wide = SETTING.pack(INITIAL_WINDOW_SIZE, MAX_WINDOW)
        writer.write(
            PREFACE
            + frame(SETTINGS, 0, 0, wide)
            + frame(WINDOW_UPDATE, 0, 0, WORD.pack(MAX_WINDOW - 65535))
            + frame(HEADERS, END_HEADERS | END_STREAM, 1, encode(grpc_request(1, b"/s.S/M")))
        )
        call = await upstream.next_stream()
        call.respond(OK)
        sending = asyncio.create_task(call.send(b"w" * 64 * 1024 * 1024))
        async with asyncio.timeout(SAFETY):
            await call.reset.wait()  # the connection was cut: the call with it
            await proxy.idle.wait()
        assert call.reset_code == CANCEL
        assert proxy.limiter.in_flight == 0
        assert not proxy.h2_connections
        assert not sending.done()  # the model server was held back, far from its end
        sending.cancel()
        writer.close()
        await _closed(reader)
    assert proxy.metrics.client_disconnects["streaming"] == 1


def _connected(sock: socket.socket, port: int) -> socket.socket:
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def _closed(reader: asyncio.StreamReader) -> None:
    try:
        async with asyncio.timeout(SAFETY):
            while await reader.read(1 << 20):
                pass
    except ConnectionError:
        pass  # reset: the proxy aborted


async def test_client_cancels_are_counted_by_how_far_the_call_had_come(tmp_path: Path) -> None:
    """Before its slot (queued), before the response headers (waiting), after (streaming)."""
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, concurrency=1) as (proxy, url),
    ):
        client = await H2Client.connect(port_of(url))
        port = port_of(url)
        holding = client.request(grpc_request(port, b"/s.S/Hold"), grpc_frame(b""))
        first = await upstream.next_stream()
        queued = client.request(grpc_request(port, b"/s.S/Queued"), grpc_frame(b""))
        await client.ping()  # the proxy has read it: it waits for the slot
        client.reset(queued)
        await client.ping()
        assert proxy.metrics.client_disconnects == {"queued": 1, "waiting": 0, "streaming": 0}

        client.reset(holding)  # admitted, no response headers yet
        async with asyncio.timeout(SAFETY):
            await first.reset.wait()
        assert proxy.metrics.client_disconnects == {"queued": 1, "waiting": 1, "streaming": 0}

        streaming = client.request(grpc_request(port, b"/s.S/Stream"), grpc_frame(b""))
        third = await upstream.next_stream()
        third.respond(OK)
        await client.replies[streaming].got_headers.wait()
        client.reset(streaming)
        async with asyncio.timeout(SAFETY):
            await third.reset.wait()
            await proxy.idle.wait()
        await client.close()
    assert proxy.metrics.client_disconnects == {"queued": 1, "waiting": 1, "streaming": 1}
    assert proxy.metrics.grpc_requests["CANCELLED"] == 3
