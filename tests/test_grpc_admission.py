"""gRPC calls under the proxy's rules: each refusal as the contract's trailers-only status,
the limiter slot held by an open stream, cancels passed to the model server at once, and
every call counted and logged."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from grpc import aio

from .conftest import free_port, in_process_proxy
from .grpc_servers import channel, grpc_model, method
from .h2peers import H2Client, H2Upstream, grpc_frame, grpc_request
from .test_grpc import grpc_proxy, port_of, through_proxy

SAFETY = 10.0
KEY = "grpc-K3y"


async def failed(call: aio.Call) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    return error.value


# -- refusals -----------------------------------------------------------------------------


async def test_a_refusal_is_a_trailers_only_response(tmp_path: Path) -> None:
    async with grpc_model() as (_, port), grpc_proxy(tmp_path, port) as (proxy, url):
        proxy.state.enter("unready", proxy.state.pid)
        client = await H2Client.connect(port_of(url))
        stream_id = client.request(grpc_request(port_of(url), b"/a.B/C"), grpc_frame(b"x"))
        reply = await client.reply(stream_id)
        await client.close()
    assert reply.header_frames == 1
    assert reply.trailers is None
    assert bytes(reply.data) == b""
    assert reply.headers is not None
    assert [name for name, _ in reply.headers] == [
        b":status",
        b"content-type",
        b"grpc-status",
        b"grpc-message",
    ]
    assert reply.status == 200
    assert reply.header(b"content-type") == b"application/grpc"
    assert reply.header(b"grpc-status") == b"14"
    assert reply.header(b"grpc-message") == b"the model server is not ready"


async def test_a_call_refused_while_still_sending_is_told_to_stop_and_forgotten(
    tmp_path: Path,
) -> None:
    """A refusal that comes before the client's message ended is followed by RST_STREAM
    (NO_ERROR, RFC 9113 §8.1), and the connection keeps nothing of the call: it goes idle,
    and away, as usual."""
    idle_soon = {"keepalive_timeout_seconds": 0.2}
    async with (
        grpc_model() as (_, port),
        grpc_proxy(tmp_path, port, proxy=idle_soon) as (proxy, url),
    ):
        proxy.state.enter("unready", proxy.state.pid)
        client = await H2Client.connect(port_of(url))
        request = grpc_request(port_of(url), b"/a.B/C")
        stream_ids = [client.request(request, grpc_frame(b"x"), end=False) for _ in range(5)]
        replies = [await client.reply(stream_id) for stream_id in stream_ids]
        [connection] = proxy.h2_connections
        assert connection.active_streams == 0
        async with asyncio.timeout(SAFETY):
            await client.got_goaway.wait()  # idle, then GOAWAY: no refused call held it open
        await client.close()
    assert [reply.header(b"grpc-status") for reply in replies] == [b"14"] * 5
    assert [reply.reset_code for reply in replies] == [0] * 5


async def test_not_ready_and_draining_are_unavailable(tmp_path: Path) -> None:
    async with through_proxy(tmp_path) as (_, proxy, chan):
        unary = chan.unary_unary(method("Unary"))
        proxy.state.enter("starting", proxy.state.pid)
        not_ready = await failed(unary(b"x"))
        proxy.state.enter("ready", proxy.state.pid)
        proxy.closed = True  # the drain closed the listener; this connection is still open
        draining = await failed(unary(b"x"))
    assert (not_ready.code(), not_ready.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "the model server is not ready",
    )
    assert (draining.code(), draining.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "the proxy is shutting down",
    )
    assert proxy.metrics.rejected == {"not_ready": 1, "draining": 1}
    assert proxy.metrics.grpc_requests["UNAVAILABLE"] == 2


async def test_a_full_queue_is_resource_exhausted(tmp_path: Path) -> None:
    async with through_proxy(tmp_path, concurrency=1, proxy={"max_queue_size": 0}) as (
        model,
        proxy,
        chan,
    ):
        model.release.clear()
        holding = chan.unary_unary(method("Hold"))(b"first")
        async with asyncio.timeout(SAFETY):
            await model.started.wait()
        error = await failed(chan.unary_unary(method("Unary"))(b"second"))
        model.release.set()
        assert await holding == b"first"
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "too many requests are waiting"
    assert proxy.metrics.rejected == {"queue_full": 1}


async def test_a_queue_timeout_is_resource_exhausted(tmp_path: Path) -> None:
    settings = {"max_queue_size": 4, "queue_timeout_seconds": 0.1}
    async with through_proxy(tmp_path, concurrency=1, proxy=settings) as (model, proxy, chan):
        model.release.clear()
        holding = chan.unary_unary(method("Hold"))(b"first")
        async with asyncio.timeout(SAFETY):
            await model.started.wait()
        error = await failed(chan.unary_unary(method("Unary"))(b"second"))
        model.release.set()
        await holding
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "timed out waiting for a free slot"
    assert proxy.metrics.rejected == {"queue_timeout": 1}


async def test_the_api_key_is_read_from_the_authorization_metadata(tmp_path: Path) -> None:
    (tmp_path / "api_key").write_text(KEY + "\n")
    async with through_proxy(tmp_path, proxy={"api_key_secret": "api_key"}) as (_, proxy, chan):
        unary = chan.unary_unary(method("Unary"))
        missing = await failed(unary(b"x"))
        wrong = await failed(unary(b"x", metadata=(("authorization", "Bearer nope"),)))
        bearer = await unary(b"ab", metadata=(("authorization", f"Bearer {KEY}"),))
        api_key = await unary(b"cd", metadata=(("authorization", f"Api-Key {KEY}"),))
    for error in (missing, wrong):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer <key> or Api-Key <key>" in (error.details() or "")
    assert (bearer, api_key) == (b"ba", b"dc")
    assert proxy.metrics.rejected == {"unauthorized": 2}


async def test_an_unreachable_model_server_is_unavailable(tmp_path: Path) -> None:
    async with grpc_proxy(tmp_path, free_port()) as (proxy, url), channel(url) as chan:
        error = await failed(chan.unary_unary(method("Unary"))(b"x"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot connect to the model server" in (error.details() or "")
    assert proxy.limiter.in_flight == 0


async def test_no_response_headers_in_time_is_deadline_exceeded(tmp_path: Path) -> None:
    settings = {"request_timeout_seconds": 0.2}
    async with through_proxy(tmp_path, proxy=settings) as (model, proxy, chan):
        model.release.clear()
        error = await failed(chan.unary_unary(method("Hold"))(b"x"))
        async with asyncio.timeout(SAFETY):
            await model.cancelled.wait()  # the model server's call was cancelled
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.details() == "the model server did not answer in time"
    assert proxy.metrics.grpc_requests["DEADLINE_EXCEEDED"] == 1


async def test_a_stream_that_started_in_time_is_not_cut(tmp_path: Path) -> None:
    settings = {"request_timeout_seconds": 0.2}
    async with through_proxy(tmp_path, proxy=settings) as (model, _, chan):
        call = chan.stream_stream(method("Bidi"))()
        await call.write(b"a")
        assert await call.read() == b"A"
        # a call sent now times out only once more than the timeout has passed since the
        # stream began: a clock without sleeping
        model.release.clear()
        stalled = await failed(chan.unary_unary(method("Hold"))(b"x"))
        assert stalled.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await call.write(b"b")
        assert await call.read() == b"B"
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


# -- the limiter and cancels ----------------------------------------------------------------


async def test_an_open_stream_holds_its_slot_until_it_closes(tmp_path: Path) -> None:
    async with through_proxy(tmp_path, concurrency=1, proxy={"max_queue_size": 0}) as (
        _,
        proxy,
        chan,
    ):
        stream = chan.stream_stream(method("Bidi"))()
        await stream.write(b"open")
        assert await stream.read() == b"OPEN"
        assert proxy.limiter.in_flight == 1
        refused = await failed(chan.unary_unary(method("Unary"))(b"x"))
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
        assert await chan.unary_unary(method("Unary"))(b"xy") == b"yx"
        assert proxy.limiter.in_flight == 0
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_client_cancel_cancels_the_call_at_the_model_server(tmp_path: Path) -> None:
    async with through_proxy(tmp_path) as (model, proxy, chan):
        model.release.clear()
        call = chan.unary_unary(method("Hold"))(b"x")
        async with asyncio.timeout(SAFETY):
            await model.started.wait()
        call.cancel()
        async with asyncio.timeout(SAFETY):
            await model.cancelled.wait()
        assert proxy.limiter.in_flight == 0
    assert proxy.metrics.grpc_requests["CANCELLED"] == 1
    assert proxy.metrics.requests[("grpc", "POST", 499)] == 1


async def test_a_lost_client_connection_resets_the_stream_upstream(tmp_path: Path) -> None:
    async with H2Upstream().serving() as upstream, grpc_proxy(tmp_path, upstream.port) as (p, url):
        client = await H2Client.connect(port_of(url))
        client.request(grpc_request(port_of(url), b"/s.S/Stream"), grpc_frame(b""), end=False)
        stream = await upstream.next_stream()
        stream.respond([(b":status", b"200"), (b"content-type", b"application/grpc")])
        await client.close()  # the client's socket is gone
        async with asyncio.timeout(SAFETY):
            await stream.reset.wait()
        assert stream.reset_code == 0x8  # CANCEL
        assert p.limiter.in_flight == 0
    assert p.metrics.grpc_requests["CANCELLED"] == 1


async def test_a_reset_from_the_model_server_reaches_the_client(tmp_path: Path) -> None:
    async with H2Upstream().serving() as upstream, grpc_proxy(tmp_path, upstream.port) as (p, url):
        client = await H2Client.connect(port_of(url))
        stream_id = client.request(grpc_request(port_of(url), b"/s.S/M"), grpc_frame(b""))
        stream = await upstream.next_stream()
        stream.peer.conn.reset_stream(stream.stream_id, 0x7)  # REFUSED_STREAM
        stream.peer.flush()
        reply = await client.reply(stream_id)
        await client.close()
    assert reply.reset_code == 0x7
    assert p.metrics.grpc_requests["UNAVAILABLE"] == 1


async def test_a_model_server_that_dies_mid_stream_ends_the_call_unavailable(
    tmp_path: Path,
) -> None:
    async with H2Upstream().serving() as upstream, grpc_proxy(tmp_path, upstream.port) as (p, url):
        client = await H2Client.connect(port_of(url))
        stream_id = client.request(grpc_request(port_of(url), b"/s.S/M"), grpc_frame(b""))
        stream = await upstream.next_stream()
        stream.respond([(b":status", b"200"), (b"content-type", b"application/grpc")])
        await stream.send(grpc_frame(b"one"))
        await stream.peer.close()  # between two messages
        reply = await client.reply(stream_id)
        await client.close()
    assert bytes(reply.data) == grpc_frame(b"one")
    assert reply.trailer(b"grpc-status") == b"14"
    assert p.metrics.grpc_requests["UNAVAILABLE"] == 1


# -- slow senders ---------------------------------------------------------------------------

SLOW_BODY = {"client_body_timeout_seconds": 0.2}


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"\0\0\0", id="part-of-a-prefix"),
        pytest.param(grpc_frame(b"a whole message")[:-3], id="most-of-a-message"),
    ],
)
async def test_a_client_whose_first_message_stops_arriving_loses_its_slot(
    tmp_path: Path, sent: bytes
) -> None:
    """As an HTTP/1.1 body: a pause longer than client_body_timeout_seconds before the first
    message is whole ends the call (4 DEADLINE_EXCEEDED), cancels it at the model server and
    frees the slot for the next call."""
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, concurrency=1, proxy=SLOW_BODY) as (proxy, url),
    ):
        client = await H2Client.connect(port_of(url))
        request = grpc_request(port_of(url), b"/a.B/Slow")
        slow = client.request(request, sent, end=False)
        held = await upstream.next_stream()
        assert proxy.limiter.in_flight == 1
        reply = await client.reply(slow)
        async with asyncio.timeout(SAFETY):
            await held.reset.wait()  # cancelled at the model server
        assert held.reset_code == 0x8
        assert proxy.limiter.in_flight == 0
        # the slot serves the next call
        after = client.request(grpc_request(port_of(url), b"/a.B/Next"), grpc_frame(b"x"))
        answered = await upstream.next_stream()
        answered.respond([(b":status", b"200"), (b"content-type", b"application/grpc")])
        answered.trailers([(b"grpc-status", b"0")])
        assert (await client.reply(after)).trailers == [(b"grpc-status", b"0")]
        await client.close()
    assert reply.header(b"grpc-status") == b"4"
    assert (
        reply.header(b"grpc-message") == b"timed out reading the request: its first message stopped"
    )
    assert bytes(held.data) == sent
    assert proxy.metrics.grpc_requests["DEADLINE_EXCEEDED"] == 1


@pytest.mark.parametrize("engaged_by", ["a-whole-first-message", "the-model-servers-answer"])
async def test_a_quiet_client_keeps_a_call_under_way(tmp_path: Path, engaged_by: str) -> None:
    """Once its first message is whole, or the model server answered, a client may go quiet
    (a bidirectional call waits on the model server): only the call opened after it, which
    sends nothing, times out."""
    async with (
        H2Upstream().serving() as upstream,
        grpc_proxy(tmp_path, upstream.port, proxy=SLOW_BODY) as (_, url),
    ):
        client = await H2Client.connect(port_of(url))
        first = b"" if engaged_by == "the-model-servers-answer" else grpc_frame(b"hello")
        quiet = client.request(grpc_request(port_of(url), b"/a.B/Chat"), first, end=False)
        chat = await upstream.next_stream()
        if first:
            await chat.wait_for_data(len(first))
        else:
            chat.respond([(b":status", b"200"), (b"content-type", b"application/grpc")])
            await client.replies[quiet].got_headers.wait()
        # a second call that sends nothing: its timeout, longer after the first's start, is
        # the clock this test reads
        timed_out = client.request(grpc_request(port_of(url), b"/a.B/Late"), end=False)
        late = await client.reply(timed_out)
        assert late.header(b"grpc-status") == b"4"
        assert not client.replies[quiet].ended.is_set()
        assert not chat.reset.is_set()
        # and the quiet call ends as the model server ends it
        if first:
            chat.respond([(b":status", b"200"), (b"content-type", b"application/grpc")])
        chat.trailers([(b"grpc-status", b"0")])
        assert (await client.reply(quiet)).trailers == [(b"grpc-status", b"0")]
        await client.close()


# -- counted and logged ---------------------------------------------------------------------


async def test_calls_are_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="model_proxy.access")
    async with through_proxy(tmp_path) as (_, proxy, chan):
        assert await chan.unary_unary(method("Unary"))(b"x") == b"x"
        await failed(chan.unary_unary(method("Unary"))(b"fail:no"))
        exposition = proxy.metrics.render().decode()
        assert proxy.access_log is not None
        proxy.access_log.flush()
    assert 'model_proxy_requests_total{code="200",method="POST",route="grpc"} 2.0' in exposition
    assert 'model_proxy_request_duration_seconds_count{route="grpc"} 2.0' in exposition
    assert 'model_proxy_time_to_first_byte_seconds_count{route="grpc"} 2.0' in exposition
    assert "model_proxy_queue_wait_seconds_count 2.0" in exposition  # both were admitted
    assert 'model_proxy_grpc_requests_total{grpc_code="OK"} 1.0' in exposition
    assert 'model_proxy_grpc_requests_total{grpc_code="INVALID_ARGUMENT"} 1.0' in exposition
    assert 'model_proxy_grpc_messages_total{direction="client_to_upstream"} 2.0' in exposition
    assert 'model_proxy_grpc_messages_total{direction="upstream_to_client"} 1.0' in exposition
    lines = "\n".join(record.getMessage() for record in caplog.records)
    assert f'"POST /{method("Unary")[1:]} HTTP/2" 200 grpc-status=OK' in lines
    assert '"POST /test.Model/Unary HTTP/2" 200 grpc-status=INVALID_ARGUMENT' in lines


async def test_every_grpc_code_is_exposed_from_the_start(tmp_path: Path) -> None:
    async with in_process_proxy(tmp_path, free_port()) as (proxy, _):
        exposition = proxy.metrics.render().decode()
    codes = [name for name in grpc.StatusCode.__members__]
    assert len(codes) == 17
    for code in codes:
        assert f'model_proxy_grpc_requests_total{{grpc_code="{code}"}} 0.0' in exposition
    for direction in ("client_to_upstream", "upstream_to_client"):
        assert f'model_proxy_grpc_messages_total{{direction="{direction}"}} 0.0' in exposition
