"""gRPC calls through the proxy's HTTP/2 side, real sockets both ways: every call kind with
grpcio, metadata and trailers byte for byte, messages passed as they come, flow control end
to end, a 20 MB message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc import aio

from proxy.app import Proxy
from proxy.h2conn import STREAM_WINDOW

from .conftest import fake_upstream, in_process_proxy
from .grpc_servers import Model, channel, grpc_model, method
from .h2peers import H2Client, H2Upstream, grpc_frame, grpc_request

SAFETY = 10.0


@asynccontextmanager
async def grpc_proxy(
    tmp_path: Path, grpc_port: int, *, concurrency: int = 4, **config: Any
) -> AsyncIterator[tuple[Proxy, str]]:
    """The proxy in front of a child that speaks only gRPC (runtime.transport.kind grpc)."""
    extra = {"runtime": {"predict_concurrency": concurrency, "transport": {"kind": "grpc"}}}
    async with in_process_proxy(tmp_path, grpc_port, extra=extra, **config) as running:
        yield running


@asynccontextmanager
async def through_proxy(
    tmp_path: Path, **config: Any
) -> AsyncIterator[tuple[Model, Proxy, aio.Channel]]:
    """The grpcio model, the proxy in front of it, and a grpcio channel to the proxy."""
    async with (
        grpc_model() as (model, port),
        grpc_proxy(tmp_path, port, **config) as (proxy, url),
        channel(url) as chan,
    ):
        yield model, proxy, chan


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- every call kind, with grpcio on both ends ----------------------------------------------


async def test_unary_call_with_metadata_both_ways(tmp_path: Path) -> None:
    async with through_proxy(tmp_path) as (model, _, chan):
        call = chan.unary_unary(method("Unary"))(
            b"hello",
            metadata=(("x-custom", "value"), ("x-custom-bin", b"\x00\x01\xfe")),
        )
        assert await call == b"olleh"
        assert await call.code() == grpc.StatusCode.OK
        initial = await call.initial_metadata()
        trailing = await call.trailing_metadata()
    assert ("x-custom", "value") in model.metadata
    assert ("x-custom-bin", b"\x00\x01\xfe") in model.metadata
    assert ("x-initial", "yes") in list(initial)
    assert ("x-initial-bin", b"\x00\xff") in list(initial)
    assert ("x-trailer", "done") in list(trailing)
    assert ("x-trailer-bin", b"\x01\x02\x00") in list(trailing)


async def test_an_error_status_with_details_reaches_the_client(tmp_path: Path) -> None:
    async with through_proxy(tmp_path) as (_, _, chan):
        with pytest.raises(aio.AioRpcError) as failed:
            await chan.unary_unary(method("Unary"))(b"fail:bad input")
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details() == "bad input"
    trailing = dict(failed.value.trailing_metadata() or ())
    assert trailing["grpc-status-details-bin"] == b"\x08\x03\x12\x04why?"


async def test_server_streaming(tmp_path: Path) -> None:
    async with through_proxy(tmp_path) as (_, proxy, chan):
        messages = [m async for m in chan.unary_stream(method("Stream"))(b"50:100")]
    assert [int.from_bytes(m[:4], "big") for m in messages] == list(range(50))
    assert all(len(m) == 100 for m in messages)
    assert proxy.metrics.grpc_messages == {"client_to_upstream": 1, "upstream_to_client": 50}


async def test_client_streaming(tmp_path: Path) -> None:
    async def messages() -> AsyncIterator[bytes]:
        for index in range(30):
            yield b"m" * index

    async with through_proxy(tmp_path) as (_, proxy, chan):
        reply = await chan.stream_unary(method("Collect"))(messages())
    assert reply == b"30:%d" % sum(range(30))
    assert proxy.metrics.grpc_messages == {"client_to_upstream": 30, "upstream_to_client": 1}


async def test_bidirectional_messages_pass_one_by_one(tmp_path: Path) -> None:
    """Each message reaches the model server, and its answer the client, before the client
    sends the next: nothing is held back for a batch."""
    async with through_proxy(tmp_path) as (model, _, chan):
        call = chan.stream_stream(method("Bidi"))()
        for word in (b"one", b"two", b"three"):
            await call.write(word)
            async with asyncio.timeout(SAFETY):
                assert await model.received.get() == word
                assert await call.read() == word.upper()
        await call.done_writing()
        assert await call.read() == aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_a_20_mb_message_passes_both_ways(tmp_path: Path) -> None:
    message = bytes(range(256)) * (20 * 1000 * 1000 // 256)
    async with through_proxy(tmp_path) as (_, _, chan):
        reply = await chan.unary_unary(method("Unary"))(message)
    assert reply == message[::-1]


async def test_grpc_beside_http_with_grpc_upstream_port(tmp_path: Path) -> None:
    """MLServer's layout: HTTP on server_port, gRPC on grpc_upstream_port, one proxy port and
    one limiter: a gRPC stream and a /predict request each hold the other out of the slot."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def predict(http: web.Request) -> web.Response:
        body = await http.read()
        if body == b"hold":
            entered.set()
            await release.wait()
        return web.Response(body=body)

    app = web.Application()
    app.router.add_post("/predict", predict)
    async with (
        grpc_model() as (_, port),
        fake_upstream(app) as http_port,
        in_process_proxy(
            tmp_path,
            http_port,
            predict_concurrency=1,
            proxy={"grpc_upstream_port": port, "max_queue_size": 0},
        ) as (proxy, url),
        channel(url) as chan,
        aiohttp.ClientSession() as session,
    ):
        unary = chan.unary_unary(method("Unary"))
        assert await unary(b"abc") == b"cba"
        async with session.post(url + "/predict", data=b"rest") as response:
            assert (response.status, await response.read()) == (200, b"rest")
        # an open gRPC stream holds the one slot: /predict is refused
        stream = chan.stream_stream(method("Bidi"))()
        await stream.write(b"open")
        assert await stream.read() == b"OPEN"
        async with session.post(url + "/predict", data=b"x") as response:
            assert response.status == 503
            assert (await response.json())["error"]["type"] == "queue_full"
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
        # a /predict in flight holds it: a gRPC call is refused
        holding = asyncio.ensure_future(session.post(url + "/predict", data=b"hold"))
        async with asyncio.timeout(SAFETY):
            await entered.wait()
        with pytest.raises(aio.AioRpcError) as refused:
            await unary(b"x")
        release.set()
        async with await holding as response:
            assert (response.status, await response.read()) == (200, b"hold")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert proxy.metrics.rejected == {"queue_full": 2}


async def test_many_calls_share_one_upstream_connection(tmp_path: Path) -> None:
    async with through_proxy(tmp_path, concurrency=16) as (_, proxy, chan):
        unary = chan.unary_unary(method("Unary"))
        replies = await asyncio.gather(*(unary(b"%d" % i) for i in range(100)))
        assert replies == [(b"%d" % i)[::-1] for i in range(100)]
        assert proxy.grpc_upstream is not None
        assert len(proxy.grpc_upstream.connections) == 1


# -- the frames themselves ----------------------------------------------------------------


async def test_headers_metadata_and_trailers_pass_byte_for_byte(tmp_path: Path) -> None:
    async with H2Upstream().serving() as upstream, grpc_proxy(tmp_path, upstream.port) as (_, url):
        client = await H2Client.connect(port_of(url))
        headers = grpc_request(
            port_of(url),
            b"/pkg.v1.Service/Method",
            (b"grpc-timeout", b"1500m"),
            (b"x-meta", b"Some Value"),
            (b"x-meta-bin", b"AAEC/w"),
        )
        stream_id = client.request(headers, grpc_frame(b"request"))
        stream = await upstream.next_stream()
        assert stream.headers == headers  # :path, te, grpc-timeout, metadata: unchanged
        await stream.wait_for_data(len(grpc_frame(b"request")))
        stream.respond([(b":status", b"200"), (b"content-type", b"application/grpc+proto"),
                        (b"x-reply-bin", b"AQI")])  # fmt: skip
        await stream.send(grpc_frame(b"response"))
        trailers = [
            (b"grpc-status", b"0"),
            (b"grpc-message", b"all%20good"),
            (b"grpc-status-details-bin", b"CAMSBHdoeT8"),
            (b"x-custom-trailer", b"t"),
        ]
        stream.trailers(trailers)
        reply = await client.reply(stream_id)
        await client.close()
    assert reply.headers == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc+proto"),
        (b"x-reply-bin", b"AQI"),
    ]
    assert bytes(reply.data) == grpc_frame(b"response")
    assert reply.trailers == trailers


async def test_a_slow_reader_slows_the_sender(tmp_path: Path) -> None:
    """The client reads nothing: the model server can send no more than the client's window
    and the proxy's own per-stream window (all the proxy holds), then waits; once the
    client reads, the rest flows."""
    total = 8 * 1024 * 1024
    payload = grpc_frame(b"x" * (total - 5))
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port) as (proxy, url),
    ):
        client = await H2Client.connect(port_of(url), auto_ack=False)
        stream_id = client.request(grpc_request(port_of(url), b"/s.S/Stream"), grpc_frame(b""))
        stream = await upstream.next_stream()
        stream.respond([(b":status", b"200"), (b"content-type", b"application/grpc")])
        sending = asyncio.create_task(stream.send(payload))
        sender = upstream.connections[0]
        await sender.wait_until_stalled(stream.stream_id)
        # h2's default window: the client never enlarged it, nor handed any of it back
        assert sender.sent[stream.stream_id] <= 65535 + STREAM_WINDOW
        [connection] = proxy.h2_connections
        assert connection.queued(stream_id) <= STREAM_WINDOW
        assert not sending.done()

        reply = client.replies[stream_id]
        async with asyncio.timeout(SAFETY):
            while len(reply.data) < len(payload):
                client.ack(stream_id)
                reply.got_data.clear()
                await reply.got_data.wait()
        await sending
        stream.trailers([(b"grpc-status", b"0")])
        await client.reply(stream_id)
        await client.close()
    assert bytes(reply.data) == payload


async def test_a_slow_model_server_slows_the_client(tmp_path: Path) -> None:
    """The other way: the model server takes nothing, so the client's sending stops after
    the model server's window and the proxy's; once it reads, the whole request passes."""
    total = 4 * 1024 * 1024
    payload = grpc_frame(b"y" * (total - 5))
    async with (
        H2Upstream(auto_ack=False).serving() as upstream,
        grpc_proxy(tmp_path, upstream.port) as (_, url),
    ):
        client = await H2Client.connect(port_of(url))
        stream_id = client.request(grpc_request(port_of(url), b"/s.S/Collect"), end=False)
        sending = asyncio.create_task(client.send_all(stream_id, payload, end=True))
        stream = await upstream.next_stream()
        await client.wait_until_stalled(stream_id)
        assert client.sent[stream_id] <= 65535 + STREAM_WINDOW
        assert not sending.done()
        async with asyncio.timeout(SAFETY):
            while len(stream.data) < len(payload):
                stream.ack()
                stream.got_data.clear()
                await stream.got_data.wait()
            await sending
            await stream.ended.wait()
        stream.respond([(b":status", b"200"), (b"content-type", b"application/grpc"),
                        (b"grpc-status", b"0")], end=True)  # fmt: skip
        reply = await client.reply(stream_id)
        await client.close()
    assert bytes(stream.data) == payload
    assert reply.header(b"grpc-status") == b"0"
