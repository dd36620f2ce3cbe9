"""The proxy's HTTP/2 against clients that break the rules on purpose, frame by frame on a raw
socket, in the shapes h2spec checks (RFC 9113, RFC 7541): each gets the connection error or
the stream error the RFC names; floods are cut or stay bounded; random frame sequences never
raise, never log a traceback, never leave a call, a slot or a connection behind."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import h2server
from proxy.app import Proxy
from proxy.h2conn import H2Endpoint
from proxy.h2frames import (
    CONTINUATION,
    DATA,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTING,
    SETTINGS,
    SETTINGS_MAX_FRAME,
    WINDOW_UPDATE,
    WORD,
    frame,
)
from proxy.hpack_codec import encode

from .h2peers import H2Upstream, grpc_frame
from .test_grpc import grpc_proxy, port_of
from .test_h2conn import RawPeer, proxied, request_block

SAFETY = 5.0
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x1, 0x3, 0x5
FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x6, 0x7, 0x9, 0xB
HEALTH = encode([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/health")])


def word(value: int) -> bytes:
    return WORD.pack(value)


def settings_frame(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(key, value) for key, value in pairs))


def request(stream_id: int, flags: int = END_HEADERS) -> bytes:
    return frame(HEADERS, flags, stream_id, request_block(1))


# -- connection errors: GOAWAY with the code RFC 9113 gives, then the socket closes ---------

CONNECTION_ERRORS = {
    "settings-ack-with-payload": ([frame(SETTINGS, 0x1, 0, bytes(6))], FRAME_SIZE_ERROR),
    "settings-not-a-multiple-of-6": ([frame(SETTINGS, 0, 0, bytes(5))], FRAME_SIZE_ERROR),
    "settings-on-a-stream": ([frame(SETTINGS, 0, 1, b"")], PROTOCOL_ERROR),
    "enable-push-2": ([settings_frame((ENABLE_PUSH, 2))], PROTOCOL_ERROR),
    "initial-window-2^31": ([settings_frame((INITIAL_WINDOW_SIZE, 2**31))], FLOW_CONTROL_ERROR),
    "max-frame-too-small": ([settings_frame((SETTINGS_MAX_FRAME, 16383))], PROTOCOL_ERROR),
    "max-frame-too-large": ([settings_frame((SETTINGS_MAX_FRAME, 2**24))], PROTOCOL_ERROR),
    "ping-on-a-stream": ([frame(PING, 0, 1, bytes(8))], PROTOCOL_ERROR),
    "ping-of-9-bytes": ([frame(PING, 0, 0, bytes(9))], FRAME_SIZE_ERROR),
    "goaway-on-a-stream": ([frame(GOAWAY, 0, 1, bytes(8))], PROTOCOL_ERROR),
    "goaway-too-short": ([frame(GOAWAY, 0, 0, bytes(7))], FRAME_SIZE_ERROR),
    "rst-on-stream-0": ([frame(RST_STREAM, 0, 0, word(8))], PROTOCOL_ERROR),
    "rst-on-idle-stream": ([frame(RST_STREAM, 0, 1, word(8))], PROTOCOL_ERROR),
    "rst-of-3-bytes": ([request(1), frame(RST_STREAM, 0, 1, bytes(3))], FRAME_SIZE_ERROR),
    "window-update-0": ([frame(WINDOW_UPDATE, 0, 0, word(0))], PROTOCOL_ERROR),
    "window-update-on-idle-stream": ([frame(WINDOW_UPDATE, 0, 1, word(1))], PROTOCOL_ERROR),
    "window-update-of-3-bytes": ([frame(WINDOW_UPDATE, 0, 0, bytes(3))], FRAME_SIZE_ERROR),
    "connection-window-past-2^31-1": (
        [frame(WINDOW_UPDATE, 0, 0, word(2**31 - 65535))],
        FLOW_CONTROL_ERROR,
    ),
    "stream-window-past-2^31-1-by-settings": (
        [
            request(1),
            frame(WINDOW_UPDATE, 0, 1, word(2**31 - 1 - 65535)),
            settings_frame((INITIAL_WINDOW_SIZE, 65536)),
        ],
        FLOW_CONTROL_ERROR,
    ),
    "headers-on-stream-0": ([frame(HEADERS, END_HEADERS, 0, request_block(1))], PROTOCOL_ERROR),
    "priority-on-stream-0": ([frame(PRIORITY, 0, 0, bytes(5))], PROTOCOL_ERROR),
    "priority-of-4-bytes": ([frame(PRIORITY, 0, 1, bytes(4))], FRAME_SIZE_ERROR),
    "push-promise-from-a-client": ([frame(PUSH_PROMISE, END_HEADERS, 1, word(2))], PROTOCOL_ERROR),
    "data-on-an-idle-stream": ([frame(DATA, 0, 1, b"x")], PROTOCOL_ERROR),
    "data-padding-past-its-end": ([request(1), frame(DATA, PADDED, 1, b"\x05abc")], PROTOCOL_ERROR),
    "headers-padding-past-its-end": (
        [frame(HEADERS, END_HEADERS | PADDED, 1, b"\xff" + request_block(1))],
        PROTOCOL_ERROR,
    ),
    "headers-too-short-for-priority": (
        [frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, b"\x00\x00")],
        FRAME_SIZE_ERROR,
    ),
    "decreasing-stream-id": ([request(5), request(3)], PROTOCOL_ERROR),
    "even-stream-id": ([request(2)], PROTOCOL_ERROR),
    "continuation-of-another-stream": (
        [frame(HEADERS, 0, 1, request_block(1)), frame(CONTINUATION, END_HEADERS, 3, b"")],
        PROTOCOL_ERROR,
    ),
    # HPACK (RFC 7541)
    "table-size-update-past-the-setting": (
        [frame(HEADERS, END_HEADERS, 1, b"\x3f\xe2\x1f")],
        COMPRESSION_ERROR,
    ),
    "integer-overflow": (
        [frame(HEADERS, END_HEADERS, 1, b"\x0f\xff\xff\xff\xff\xff\xff\x7f")],
        COMPRESSION_ERROR,
    ),
    "index-past-the-tables": ([frame(HEADERS, END_HEADERS, 1, b"\xff\x00")], COMPRESSION_ERROR),
    "huffman-padding-not-ones": (
        [frame(HEADERS, END_HEADERS, 1, b"\x82\x00\x03x-a\x81\x1e")],  # 'a' then '0' bits
        COMPRESSION_ERROR,
    ),
    "huffman-padding-over-7-bits": (
        [frame(HEADERS, END_HEADERS, 1, b"\x82\x00\x03x-a\x82\x1f\xff")],
        COMPRESSION_ERROR,
    ),
    "huffman-eos": (
        [frame(HEADERS, END_HEADERS, 1, b"\x82\x00\x03x-a\x84\xff\xff\xff\xff")],
        COMPRESSION_ERROR,
    ),
}


@pytest.mark.parametrize(("frames", "code"), CONNECTION_ERRORS.values(), ids=CONNECTION_ERRORS)
async def test_connection_errors(tmp_path: Path, frames: list[bytes], code: int) -> None:
    async with proxied(tmp_path) as (_, port):
        peer = await RawPeer.connect(port)
        peer.send(*frames)
        assert await peer.goaway_code() == code
        await peer.close()


async def test_headers_on_a_stream_closed_both_ways_is_a_connection_error(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (_, port):
        peer = await RawPeer.connect(port)
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, HEALTH))
        await peer.wait_for(DATA, 1)  # answered whole: closed both ways
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, HEALTH))
        assert await peer.goaway_code() == PROTOCOL_ERROR  # a stream id it may not use
        await peer.close()


# -- stream errors: RST_STREAM, and the connection goes on ---------------------------------

STREAM_ERRORS = {
    "window-update-0-on-a-stream": ([frame(WINDOW_UPDATE, 0, 1, word(0))], PROTOCOL_ERROR),
    "stream-window-past-2^31-1": (
        [frame(WINDOW_UPDATE, 0, 1, word(2**31 - 65535))],
        FLOW_CONTROL_ERROR,
    ),
    "trailers-without-end-stream": (
        [frame(HEADERS, END_HEADERS, 1, encode([(b"x-t", b"1")]))],
        PROTOCOL_ERROR,
    ),
    "priority-on-itself": ([frame(PRIORITY, 0, 1, word(1) + b"\x10")], PROTOCOL_ERROR),
}


@pytest.mark.parametrize(("frames", "code"), STREAM_ERRORS.values(), ids=STREAM_ERRORS)
async def test_stream_errors(tmp_path: Path, frames: list[bytes], code: int) -> None:
    async with proxied(tmp_path) as (upstream, port):
        peer = await RawPeer.connect(port)
        peer.send(request(1))
        call = await upstream.next_stream()
        peer.send(*frames)
        assert int.from_bytes(await peer.wait_for(RST_STREAM, 1), "big") == code
        async with asyncio.timeout(SAFETY):
            await call.reset.wait()  # the call is cancelled at the model server
        peer.send(frame(PING, 0, 0, b"still-up"))
        assert await peer.wait_for(PING) == b"still-up"
        await peer.close()


async def test_a_new_stream_that_depends_on_itself_is_reset(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (upstream, port):
        peer = await RawPeer.connect(port)
        peer.send(frame(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, word(1) + b"\x10" + HEALTH))
        assert int.from_bytes(await peer.wait_for(RST_STREAM, 1), "big") == PROTOCOL_ERROR
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 3, HEALTH))
        await peer.wait_for(DATA, 3)
        assert upstream.arrived.empty()
        await peer.close()


async def test_zero_length_values_pass(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (upstream, port):
        peer = await RawPeer.connect(port)
        peer.send(frame(HEADERS, END_HEADERS, 1, request_block(port, b"/a.B/C", (b"x-e", b""))))
        call = await upstream.next_stream()
        assert (b"x-e", b"") in call.headers
        await peer.close()


# -- floods and bombs ----------------------------------------------------------------------


async def test_a_continuation_flood_of_empty_frames_is_cut(tmp_path: Path) -> None:
    """CVE-2024-27316's kin: CONTINUATION frames that add nothing grow no header block, but
    each costs a frame's work; the block may take only so many."""
    async with proxied(tmp_path) as (_, port):
        peer = await RawPeer.connect(port)
        peer.send(frame(HEADERS, 0, 1, b"\x82"))
        peer.send(frame(CONTINUATION, 0, 1, b"") * 10000)
        assert await peer.goaway_code() == ENHANCE_YOUR_CALM
        await peer.close()


async def test_a_tiny_block_that_expands_past_the_list_limit_is_reset(tmp_path: Path) -> None:
    """HPACK bomb: one 4 KB field put in the dynamic table, then named by index 100 times
    (4.3 KB on the wire, 400 KB of headers): the stream is reset, nothing else."""
    async with proxied(tmp_path) as (upstream, port):
        peer = await RawPeer.connect(port)
        length = bytes([0x7F, (4000 - 127) & 0x7F | 0x80, (4000 - 127) >> 7])  # 4000, HPACK'd
        big = b"\x40\x05x-big" + length + b"b" * 4000  # a literal added to the table
        block = request_block(port) + big + b"\xbe" * 100
        peer.send(frame(HEADERS, END_HEADERS, 1, block))
        assert int.from_bytes(await peer.wait_for(RST_STREAM, 1), "big") == PROTOCOL_ERROR
        peer.send(frame(HEADERS, END_HEADERS, 3, request_block(port) + b"\xbe"))  # in step
        call = await upstream.next_stream()
        assert (b"x-big", b"b" * 4000) in call.headers
        await peer.close()


async def test_malformed_streams_by_the_thousand_are_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each costs a header block's decoding and nothing at the model server; past the
    limit of the rapid-reset rule the connection ends all the same."""
    monkeypatch.setattr(h2server, "MAX_CANCEL_DEBT", 5)
    async with proxied(tmp_path) as (upstream, port):
        peer = await RawPeer.connect(port)
        bad = request_block(port, b"/a.B/C", (b"connection", b"x"))
        for stream_id in range(1, 14, 2):
            peer.send(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, bad))
        assert await peer.goaway_code() == ENHANCE_YOUR_CALM
        assert upstream.arrived.empty()
        await peer.close()


async def test_a_thousand_streams_at_once_and_one_more(tmp_path: Path) -> None:
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, concurrency=1000) as (proxy, url),
    ):
        peer = await RawPeer.connect(port_of(url))
        block = request_block(port_of(url))
        peer.send(*(frame(HEADERS, END_HEADERS, 2 * n + 1, block) for n in range(1001)))
        assert int.from_bytes(await peer.wait_for(RST_STREAM, 2001), "big") == REFUSED_STREAM
        for _ in range(1000):
            await upstream.next_stream()
        assert proxy.limiter.in_flight == 1000
        await peer.close()
        async with asyncio.timeout(SAFETY):
            await proxy.idle.wait()  # every call cancelled, every slot back
        assert proxy.limiter.in_flight == 0


class Peak:
    """The most the proxy's HTTP/2 connections ever held in their socket buffers."""

    def __init__(self) -> None:
        self.bytes = 0

    @contextmanager
    def watching(self) -> Iterator[Peak]:
        original = H2Endpoint.flush

        def flush(endpoint: H2Endpoint) -> None:
            original(endpoint)
            if endpoint.transport is not None:
                self.bytes = max(self.bytes, endpoint.transport.get_write_buffer_size())

        H2Endpoint.flush = flush  # type: ignore[method-assign]
        try:
            yield self
        finally:
            H2Endpoint.flush = original  # type: ignore[method-assign]


FLOODS = {
    "ping": lambda n: frame(PING, 0, 0, bytes(8)),
    "settings": lambda n: frame(SETTINGS, 0, 0),
    "requests": lambda n: frame(HEADERS, END_HEADERS | END_STREAM, 2 * n + 1, HEALTH),
}


class Watched(set[Any]):
    """The proxy's HTTP/2 connections, saying when the last one is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.empty = asyncio.Event()
        self.added = asyncio.Event()

    def add(self, connection: Any) -> None:
        super().add(connection)
        self.empty.clear()
        self.added.set()

    def discard(self, connection: Any) -> None:
        super().discard(connection)
        if not self:
            self.empty.set()


@pytest.mark.parametrize("make", FLOODS.values(), ids=FLOODS)
async def test_a_flood_from_a_client_that_never_reads_stays_bounded(
    tmp_path: Path, make: Any
) -> None:
    """Each PING, SETTINGS or request asks for an answer. A client that sends them by the
    hundred thousand (5 MB) and reads none: the proxy stops reading it once its buffer is
    full (1 MiB), then cuts it after the send timeout."""
    count = 300_000
    timeout = {"client_send_timeout_seconds": 0.5}
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, proxy=timeout) as (proxy, url),
    ):
        proxy.h2_connections = connections = Watched()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port_of(url)))
        sock.setblocking(False)
        _, writer = await asyncio.open_connection(sock=sock)
        writer.write(PREFACE)
        async with asyncio.timeout(SAFETY):
            await connections.added.wait()
        # small kernel buffers both ways: what the proxy holds is what it buffers itself
        [connection] = connections
        assert connection.transport is not None
        connection.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        with Peak().watching() as peak:
            writer.write(frame(SETTINGS, 0, 0) + b"".join(map(make, range(count))))
            async with asyncio.timeout(SAFETY):
                await connections.empty.wait()  # cut, having read only part of it
        writer.transport.abort()
    assert peak.bytes < 2 * 1024 * 1024, peak.bytes  # its buffer's limit, and a read's answers


# -- random frame sequences ----------------------------------------------------------------

KINDS = [DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY,
         WINDOW_UPDATE, CONTINUATION, 0xA]  # fmt: skip
BLOCKS = [request_block(1), request_block(1)[:7], HEALTH, b"\x3f\xe1\x1f", b"\x40\x00\x00"]


def frames() -> st.SearchStrategy[list[bytes]]:
    payload = st.one_of(
        st.binary(max_size=40),
        st.sampled_from(BLOCKS),
        st.builds(grpc_frame, st.binary(max_size=30)),
        st.integers(0, 2**32 - 1).map(word),
        st.lists(st.tuples(st.integers(0, 8), st.integers(0, 2**32 - 1)), max_size=3).map(
            lambda pairs: b"".join(SETTING.pack(key, value) for key, value in pairs)
        ),
    )
    one = st.builds(
        frame,
        st.sampled_from(KINDS),
        st.one_of(st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x25, 0x2D]), st.integers(0, 255)),
        st.sampled_from([0, 1, 1, 1, 3, 3, 5, 2, 2**31 - 1]),
        payload,
    )
    opened = st.sampled_from([[], [request(1)], [request(1, END_HEADERS | END_STREAM)]])
    return st.builds(lambda start, rest: start + rest, opened, st.lists(one, max_size=12))


class Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.records.append(record)


def test_random_frame_sequences_never_break_the_proxy(tmp_path: Path) -> None:
    """Whatever a client sends, the proxy answers or closes; no exception reaches the loop,
    nothing is logged as an error, and once the client is gone no call, slot or connection
    is left."""
    errors: list[dict[str, Any]] = []
    logged = Tracebacks()
    logging.getLogger().addHandler(logged)
    examples = 0
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        stack = AsyncExitStack()

        async def start() -> tuple[Proxy, int]:
            asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
            upstream = await stack.enter_async_context(H2Upstream().serving())
            proxy, url = await stack.enter_async_context(grpc_proxy(tmp_path, upstream.port))
            return proxy, port_of(url)

        proxy, port = runner.run(start())

        async def send(sequence: list[bytes]) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(PREFACE + frame(SETTINGS, 0, 0) + b"".join(sequence))
            writer.write(frame(PING, 0, 0, b"theend!!"))
            async with asyncio.timeout(SAFETY):
                seen = b""
                while b"theend!!" not in seen and (data := await reader.read(65536)):
                    seen = seen[-8:] + data  # the proxy answered the last PING, or closed
            writer.close()
            async with asyncio.timeout(SAFETY):
                await proxy.idle.wait()  # every call it started is over
            assert proxy.limiter.in_flight == 0

        @settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
        @given(frames())
        def survives(sequence: list[bytes]) -> None:
            nonlocal examples
            examples += 1
            runner.run(send(sequence))
            assert not errors, errors

        try:
            survives()
        finally:
            runner.run(stack.aclose())
            logging.getLogger().removeHandler(logged)
    assert examples >= 1500
    assert not errors, errors
    assert not logged.records, [record.getMessage() for record in logged.records]
