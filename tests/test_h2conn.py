"""The proxy's HTTP/2 against peers that break the rules, frame by frame on a raw socket, and
against h2 (an independent implementation) where the rules allow what grpcio rarely does:
padding, CONTINUATION frames, informational responses, a GOAWAY in the middle of calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from proxy import h2conn, h2server
from proxy.h2frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    header_frames,
)
from proxy.hpack_codec import encode

from .h2peers import H2Client, H2Upstream, grpc_frame, grpc_request
from .test_grpc import grpc_proxy, port_of

SAFETY = 5.0
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, REFUSED_STREAM = 0x1, 0x3, 0x7
FRAME_SIZE_ERROR, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x6, 0x9, 0xB


class RawPeer:
    """A client that writes frames as it likes and reads what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PREFACE + frame(SETTINGS, 0, 0))
        return cls(reader, writer)

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def next_frame(self) -> tuple[int, int, int, bytes] | None:
        """(type, flags, stream, payload); None once the proxy closed the connection."""
        try:
            head = await self.reader.readexactly(9)
            payload = await self.reader.readexactly(int.from_bytes(head[:3], "big"))
        except asyncio.IncompleteReadError:
            return None
        return head[3], head[4], int.from_bytes(head[5:], "big") & 0x7FFFFFFF, payload

    async def wait_for(self, kind: int, stream_id: int | None = None) -> bytes:
        async with asyncio.timeout(SAFETY):
            while (got := await self.next_frame()) is not None:
                if got[0] == kind and (stream_id is None or got[2] == stream_id):
                    return got[3]
        raise AssertionError(f"the connection closed before a frame of type {kind}")

    async def goaway_code(self) -> int:
        payload = await self.wait_for(GOAWAY)
        async with asyncio.timeout(SAFETY):
            while await self.next_frame() is not None:
                pass  # then the proxy closes the connection
        return int.from_bytes(payload[4:8], "big")

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def request_block(port: int, path: bytes = b"/a.B/C", *extra: tuple[bytes, bytes]) -> bytes:
    return encode(grpc_request(port, path, *extra))


@asynccontextmanager
async def proxied(tmp_path: Path, **config: object) -> AsyncIterator[tuple[H2Upstream, int]]:
    """A frame-level model server that never hands a window back, the proxy before it."""
    async with (
        H2Upstream(auto_ack=False).serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, **config) as (_, url),  # type: ignore[arg-type]
    ):
        yield upstream, port_of(url)


# -- connection errors: GOAWAY with the right code, then the socket closes ----------------


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param([frame(DATA, 0, 1, b"x" * 20000)], FRAME_SIZE_ERROR, id="frame-too-large"),
        pytest.param([frame(HEADERS, END_HEADERS, 2, b"\x82")], PROTOCOL_ERROR, id="even-stream"),
        pytest.param([frame(HEADERS, END_HEADERS, 1, b"\xbe")], COMPRESSION_ERROR, id="bad-hpack"),
        pytest.param([frame(DATA, 0, 0, b"x")], PROTOCOL_ERROR, id="data-on-stream-0"),
        pytest.param([frame(PING, 0, 0, b"short")], FRAME_SIZE_ERROR, id="short-ping"),
        pytest.param(
            [frame(WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big"))],
            FLOW_CONTROL_ERROR,
            id="window-overflow",
        ),
        pytest.param(
            [frame(HEADERS, 0, 1, b"\x82"), frame(PING, 0, 0, b"12345678")],
            PROTOCOL_ERROR,
            id="interrupted-header-block",
        ),
        pytest.param(
            [frame(CONTINUATION, END_HEADERS, 1, b"\x82")], PROTOCOL_ERROR, id="stray-continuation"
        ),
    ],
)
async def test_connection_errors_get_goaway(tmp_path: Path, frames: list[bytes], code: int) -> None:
    async with proxied(tmp_path) as (_, port):
        peer = await RawPeer.connect(port)
        peer.send(*frames)
        assert await peer.goaway_code() == code
        await peer.close()


async def test_a_continuation_flood_is_cut(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (_, port):
        peer = await RawPeer.connect(port)
        peer.send(frame(HEADERS, 0, 1, b"\x82"))
        for _ in range(20):  # 320 KiB of header block, never ended
            peer.send(frame(CONTINUATION, 0, 1, b"\x40\x00" * 8192))
        assert await peer.goaway_code() == ENHANCE_YOUR_CALM
        await peer.close()


# -- stream errors: the stream is reset, the connection goes on ----------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([(b"Upper-Case", b"x")], id="upper-case-name"),
        pytest.param([(b"connection", b"close")], id="connection-specific"),
        pytest.param([(b"te", b"gzip")], id="te-not-trailers"),
        pytest.param([(b":status", b"200")], id="response-pseudo-header"),
    ],
)
async def test_malformed_requests_are_reset(
    tmp_path: Path, extra: list[tuple[bytes, bytes]]
) -> None:
    async with proxied(tmp_path) as (_, port):
        peer = await RawPeer.connect(port)
        peer.send(
            frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block(port, b"/a.B/C", *extra))
        )
        code = await peer.wait_for(RST_STREAM, 1)
        assert int.from_bytes(code, "big") == PROTOCOL_ERROR
        peer.send(frame(PING, 0, 0, b"still-up"))
        assert await peer.wait_for(PING) == b"still-up"
        await peer.close()


async def test_a_request_without_path_is_reset(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (_, port):
        peer = await RawPeer.connect(port)
        block = encode([(b":method", b"POST"), (b":scheme", b"http")])
        peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
        assert int.from_bytes(await peer.wait_for(RST_STREAM, 1), "big") == PROTOCOL_ERROR
        await peer.close()


async def test_headers_over_64_kib_reset_the_stream(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (_, port):
        peer = await RawPeer.connect(port)
        block = request_block(port, b"/a.B/C", (b"x-big", b"v" * 70000))
        peer.send(*header_frames(1, block, END_STREAM, 16384))
        assert int.from_bytes(await peer.wait_for(RST_STREAM, 1), "big") == PROTOCOL_ERROR
        peer.send(frame(PING, 0, 0, b"still-up"))
        assert await peer.wait_for(PING) == b"still-up"
        await peer.close()


async def test_data_beyond_the_stream_window_resets_the_stream(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (upstream, port):
        peer = await RawPeer.connect(port)
        peer.send(frame(HEADERS, END_HEADERS, 1, request_block(port)))
        await upstream.next_stream()
        # the model server takes nothing: 256 KiB is all the proxy accepts on the stream
        peer.send(*(frame(DATA, 0, 1, b"d" * 16384) for _ in range(17)))
        assert int.from_bytes(await peer.wait_for(RST_STREAM, 1), "big") == FLOW_CONTROL_ERROR
        await peer.close()


async def test_streams_beyond_the_limit_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h2conn, "MAX_CONCURRENT_STREAMS", 2)
    async with proxied(tmp_path) as (upstream, port):
        peer = await RawPeer.connect(port)
        for stream_id in (1, 3, 5):
            peer.send(frame(HEADERS, END_HEADERS, stream_id, request_block(port)))
        assert int.from_bytes(await peer.wait_for(RST_STREAM, 5), "big") == REFUSED_STREAM
        await upstream.next_stream()
        await upstream.next_stream()
        assert upstream.arrived.empty()
        await peer.close()


async def test_a_ping_is_answered(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (_, port):
        peer = await RawPeer.connect(port)
        peer.send(frame(PING, 0, 0, b"8 bytes!"))
        assert await peer.wait_for(PING) == b"8 bytes!"
        await peer.close()


# -- what grpcio rarely sends, from h2 ------------------------------------------------------


async def test_padded_data_reaches_the_model_server_without_its_padding(tmp_path: Path) -> None:
    async with H2Upstream().serving() as upstream, grpc_proxy(tmp_path, upstream.port) as (_, url):
        client = await H2Client.connect(port_of(url))
        stream_id = client.request(grpc_request(port_of(url), b"/a.B/C"), end=False)
        client.conn.send_data(stream_id, grpc_frame(b"padded"), pad_length=40, end_stream=True)
        client.flush()
        stream = await upstream.next_stream()
        async with asyncio.timeout(SAFETY):
            await stream.ended.wait()
        assert bytes(stream.data) == grpc_frame(b"padded")
        stream.respond([(b":status", b"200"), (b"grpc-status", b"0")], end=True)
        await client.reply(stream_id)
        await client.close()


async def test_large_metadata_crosses_in_continuation_frames(tmp_path: Path) -> None:
    big = b"m" * 40000  # more than a 16 KiB frame: HEADERS + CONTINUATION both ways
    async with H2Upstream().serving() as upstream, grpc_proxy(tmp_path, upstream.port) as (_, url):
        client = await H2Client.connect(port_of(url))
        stream_id = client.request(grpc_request(port_of(url), b"/a.B/C", (b"x-big", big)))
        stream = await upstream.next_stream()
        assert dict(stream.headers)[b"x-big"] == big
        stream.respond([(b":status", b"200"), (b"x-big-reply", big)])
        stream.trailers([(b"grpc-status", b"0"), (b"x-big-trailer", big)])
        reply = await client.reply(stream_id)
        await client.close()
    assert reply.header(b"x-big-reply") == big
    assert reply.trailer(b"x-big-trailer") == big


async def test_an_informational_response_is_skipped(tmp_path: Path) -> None:
    async with H2Upstream().serving() as upstream, grpc_proxy(tmp_path, upstream.port) as (_, url):
        client = await H2Client.connect(port_of(url))
        stream_id = client.request(grpc_request(port_of(url), b"/a.B/C"), grpc_frame(b""))
        stream = await upstream.next_stream()
        stream.respond([(b":status", b"103"), (b"link", b"</x>")])
        stream.respond([(b":status", b"200"), (b"grpc-status", b"0")], end=True)
        reply = await client.reply(stream_id)
        await client.close()
    assert reply.status == 200
    assert reply.header(b"grpc-status") == b"0"


async def test_a_goaway_from_the_model_server_lets_older_calls_finish(tmp_path: Path) -> None:
    """GOAWAY(last_stream_id=1) on the upstream connection: the call on stream 1 goes on to
    its end, the one on stream 3 was never processed: UNAVAILABLE, at once."""
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port) as (proxy, url),
    ):
        client = await H2Client.connect(port_of(url))
        first = client.request(grpc_request(port_of(url), b"/a.B/First"), grpc_frame(b""))
        older = await upstream.next_stream()
        second = client.request(grpc_request(port_of(url), b"/a.B/Second"), grpc_frame(b""))
        await upstream.next_stream()
        # written past h2, which would stop every stream of a connection it sends GOAWAY on
        older.peer.writer.write(frame(GOAWAY, 0, 0, (1).to_bytes(4, "big") + bytes(4)))
        refused = await client.reply(second)
        assert refused.header(b"grpc-status") == b"14"
        older.respond([(b":status", b"200"), (b"content-type", b"application/grpc")])
        await older.send(grpc_frame(b"done"))
        older.trailers([(b"grpc-status", b"0")])
        finished = await client.reply(first)
        assert bytes(finished.data) == grpc_frame(b"done")
        assert finished.trailer(b"grpc-status") == b"0"
        assert proxy.grpc_upstream is not None
        assert not proxy.grpc_upstream.connections  # the next call opens a new one
        await client.close()


async def test_a_client_cancelling_streams_by_the_thousand_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rapid reset (CVE-2023-44487): each stream opened and cancelled at once costs the
    model server a call started and stopped; past the limit the connection ends."""
    monkeypatch.setattr(h2server, "MAX_CANCEL_DEBT", 5)
    async with proxied(tmp_path) as (upstream, port):
        peer = await RawPeer.connect(port)
        for stream_id in range(1, 14, 2):  # 7 streams
            peer.send(
                frame(HEADERS, END_HEADERS, stream_id, request_block(port)),
                frame(RST_STREAM, 0, stream_id, (0x8).to_bytes(4, "big")),
            )
        assert await peer.goaway_code() == ENHANCE_YOUR_CALM
        await peer.close()
        assert upstream.arrived.qsize() <= 6


async def test_cancels_among_completed_calls_are_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h2server, "MAX_CANCEL_DEBT", 2)
    async with H2Upstream().serving() as upstream, grpc_proxy(tmp_path, upstream.port) as (_, url):
        client = await H2Client.connect(port_of(url))
        for _ in range(4):  # a cancel, then a completed call: never more than 1 in debt
            cancelled = client.request(grpc_request(port_of(url), b"/a.B/C"), end=False)
            await upstream.next_stream()
            client.reset(cancelled)
            done = client.request(grpc_request(port_of(url), b"/a.B/C"), grpc_frame(b""))
            stream = await upstream.next_stream()
            stream.respond([(b":status", b"200"), (b"grpc-status", b"0")], end=True)
            assert (await client.reply(done)).header(b"grpc-status") == b"0"
        assert client.goaway is None
        await client.close()
