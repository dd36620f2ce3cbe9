"""The WebSocket tunnel's timers: Truss's keepalive (runtime.transport ping_interval_seconds
and ping_timeout_seconds: the proxy pings an idle client, takes its pong out of the stream,
and closes a client that does not answer) and proxy.websocket_idle_timeout_seconds (no data
frame either way for that long: closed with 1001). Each closing frees the tunnel's slot.
FrameReader's pong cutting is checked on every way a stream can be split."""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.frames import FrameReader, control_frame
from proxy.websocket import IDLE_CHECKS, KEEPALIVE

from .conftest import fake_upstream, in_process_proxy
from .test_websocket import Recorder, no_leftovers

SAFETY = 5  # seconds; a safety net only


def keepalive(interval: float, timeout: float | None) -> dict[str, Any]:
    transport = {"kind": "websocket", "ping_interval_seconds": interval}
    if timeout is not None:
        transport["ping_timeout_seconds"] = timeout
    return {"runtime": {"predict_concurrency": 1, "transport": transport}}


async def next_message(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    async with asyncio.timeout(SAFETY):
        return await ws.receive()


async def test_an_idle_client_is_pinged_and_its_pong_never_reaches_the_model_server(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port, extra=keepalive(0.05, SAFETY)) as (proxy, url),
        aiohttp.ClientSession() as session,
        session.ws_connect(url + "/sync/ws", autoping=False) as ws,
    ):
        ping = await next_message(ws)
        assert (ping.type, ping.data) == (WSMsgType.PING, KEEPALIVE)
        await ws.pong(ping.data)
        # the model server's own ping and its pong pass as ever
        await ws.send_str("ping-me")
        while (message := await next_message(ws)).type is WSMsgType.PING and (
            message.data.startswith(b"model-proxy")
        ):
            await ws.pong(message.data)  # more of ours may come meanwhile: answered too
        assert (message.type, message.data) == (WSMsgType.PING, b"from the server")
        await ws.pong(message.data)
        await ws.send_str("after the pongs")
        while (message := await next_message(ws)).type is WSMsgType.PING:
            await ws.pong(message.data)
        assert (message.type, message.data) == (WSMsgType.TEXT, "after the pongs")
        await ws.close()
        await no_leftovers(proxy, keep_alive=0)
    kinds = [(kind, data) for kind, data, _ in recorder.received]
    assert kinds[:3] == [
        (WSMsgType.TEXT, "ping-me"),
        (WSMsgType.PONG, b"from the server"),
        (WSMsgType.TEXT, "after the pongs"),
    ]
    assert not any(
        kind is WSMsgType.PONG and data.startswith(b"model-proxy") for kind, data in kinds
    )


async def test_a_client_that_leaves_the_ping_unanswered_is_closed_and_frees_its_slot(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port, extra=keepalive(0.05, 0.1)) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(url + "/sync/ws", autoping=False) as ws:
            assert (await next_message(ws)).type is WSMsgType.PING  # and never answered
            closing = await next_message(ws)
            assert (closing.type, closing.data, closing.extra) == (
                WSMsgType.CLOSE,
                1001,
                "ping timeout",
            )
        async with asyncio.timeout(SAFETY):
            await recorder.ended.wait()
        assert recorder.close_code == 1001
        await no_leftovers(proxy)
        # predict_concurrency is 1: the slot is free for the next one
        async with session.ws_connect(url + "/sync/ws") as again:
            await again.send_str("hello")
            assert (await next_message(again)).data == "hello"


async def test_a_websocket_without_data_frames_is_closed_after_the_idle_timeout(
    tmp_path: Path,
) -> None:
    idle = 0.3
    recorder = Recorder()
    settings = {"websocket_idle_timeout_seconds": idle}
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port, predict_concurrency=1, proxy=settings) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        loop = asyncio.get_running_loop()
        async with session.ws_connect(url + "/sync/ws", autoping=False) as ws:
            await ws.send_str("hi")
            assert (await next_message(ws)).data == "hi"
            last_data = loop.time()
            await ws.ping(b"control frames are not data")
            assert (await next_message(ws)).type is WSMsgType.PONG
            closing = await next_message(ws)
            closed_at = loop.time()
        assert (closing.type, closing.data, closing.extra) == (
            WSMsgType.CLOSE,
            1001,
            "idle timeout",
        )
        assert idle <= closed_at - last_data < idle * (1 + 1 / IDLE_CHECKS) + 1  # + 1: slack
        async with asyncio.timeout(SAFETY):
            await recorder.ended.wait()
        assert recorder.close_code == 1001
        await no_leftovers(proxy)
        async with session.ws_connect(url + "/sync/ws") as again:  # the one slot is free
            await again.send_str("hello")
            assert (await next_message(again)).data == "hello"


# -- FrameReader: our pong cut out of a client's stream, however it is split ---------------

OURS = b"model-proxy 7"


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked frame, as clients send them."""
    frame = bytearray(control_frame(opcode, payload, masked=True))
    frame[0] = (0x80 if fin else 0) | opcode
    if len(payload) > 125:  # control_frame's header is for short payloads: write a long one
        mask = os.urandom(4)
        body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        frame = bytearray(((0x80 if fin else 0) | opcode, 0xFE, *len(payload).to_bytes(2, "big")))
        frame += mask + body
    return bytes(frame)


frames = st.one_of(
    st.binary(max_size=300).map(lambda data: ("data", client_frame(0x2, data))),
    st.binary(max_size=20).map(lambda data: ("data", client_frame(0x1, data, fin=False))),
    st.just(("pong", client_frame(0xA, b"for the model server"))),
    st.just(("pong", client_frame(0xA, b""))),
    st.just(("ping", client_frame(0x9, b"are you there"))),
)


@settings(max_examples=300, deadline=None)
@given(
    before=st.lists(frames, max_size=4),
    after=st.lists(frames, max_size=4),
    ours_at=st.integers(min_value=0, max_value=4),
    watch_from=st.floats(min_value=0, max_value=1),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_our_pong_is_cut_out_and_everything_else_passes_byte_for_byte(
    before: list[tuple[str, bytes]],
    after: list[tuple[str, bytes]],
    ours_at: int,
    watch_from: float,
    cuts: list[int],
) -> None:
    head = b"".join(frame for _, frame in before)
    ours = client_frame(0xA, OURS)
    tail_frames = [frame for _, frame in after]
    tail_frames.insert(min(ours_at, len(tail_frames)), ours)
    tail = b"".join(tail_frames)
    stream = head + tail
    # the ping goes out somewhere in `head`, maybe mid-frame: its pong comes in `tail`
    watch_at = int(len(head) * watch_from)
    points = sorted({0, watch_at, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    reader = FrameReader()
    passed = bytearray()
    answers = 0
    for start, end in itertools.pairwise(points):
        if start == watch_at:  # (the pong is in the tail: watch_at < len(stream))
            reader.expect_pong(OURS)
        chunk = stream[start:end]
        if reader.watching:
            _, out, answered = reader.feed_watching(chunk)
            passed += out
            answers += answered
        else:
            reader.feed(chunk)
            passed += chunk

    assert answers == 1
    assert bytes(passed) == head + tail.replace(ours, b"", 1)
    assert not reader.watching  # back on the fast path
    assert reader.at_boundary


@pytest.mark.parametrize("split", range(1, 25))
def test_a_pong_split_anywhere_is_still_recognised(split: int) -> None:
    hi, ours, theirs = client_frame(0x1, b"hi"), client_frame(0xA, OURS), client_frame(0xA, b"x")
    data = hi + ours + theirs
    reader = FrameReader()
    reader.expect_pong(OURS)

    messages, first, answered = reader.feed_watching(data[:split])
    more, second, answered_later = reader.feed_watching(data[split:])

    assert first + second == hi + theirs
    assert (answered, answered_later) == (
        (True, False) if split >= len(hi + ours) else (False, True)
    )
    assert messages + more == 1
    assert not reader.watching


def test_as_many_pongs_are_cut_out_as_pings_await_them() -> None:
    # without ping_timeout_seconds a silent client gets a ping every interval: each one's
    # pong is ours, whenever it comes; one more is the client's own, for the model server
    reader = FrameReader()
    reader.expect_pong(OURS)
    reader.expect_pong(OURS)
    pong = client_frame(0xA, OURS)

    _, out, answered = reader.feed_watching(pong + pong)
    assert (out, answered, reader.watching) == (b"", True, False)
    extra = client_frame(0xA, OURS)
    assert reader.feed(extra) == 0  # back on the fast path: passed as it is
