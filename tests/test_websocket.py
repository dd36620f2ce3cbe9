"""WebSockets through the proxy: the echo example's /ws (run as the upstream of an
in-process proxy) and fake upstreams that record what they see; aiohttp's client and the
`websockets` library on the client side."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from aiohttp import WSMsgType, web
from multidict import CIMultiDictProxy
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from proxy.app import Proxy

from .conftest import (
    ECHO_SERVER,
    Connections,
    fake_upstream,
    in_process_proxy,
    run_proxy,
    write_config,
)
from .test_metrics import metric_becomes, scrape

LARGE = 20 * 1024 * 1024


def ws_url(url: str, path: str) -> str:
    return "ws" + url.removeprefix("http") + path


def client(url: str, **options: Any) -> connect:
    """A `websockets` client that ignores proxy settings of the environment."""
    options.setdefault("proxy", None)
    return connect(url, **options)


@asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """examples/echo/server.py on a free port; yields it and its port once it listens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ECHO_SERVER), "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(10):
            line = (await process.stdout.readline()).decode()
        assert "listening on" in line, line
        yield process, int(line.rsplit(":", 1)[1])
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    """One echo server for the tests that only talk to it."""
    process = subprocess.Popen(
        [sys.executable, str(ECHO_SERVER), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    try:
        line = process.stdout.readline()
        assert "listening on" in line, line
        yield int(line.rsplit(":", 1)[1])
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()


async def no_leftovers(proxy: Proxy, *, keep_alive: int = 0) -> None:
    """Nothing of a closed WebSocket is left: a tunnel leaves `proxy.tunnels` only once
    both its sockets are closed; no client connection (but `keep_alive` HTTP ones the
    test still uses), slot or proxy task remains."""
    async with asyncio.timeout(5):
        await proxy.no_tunnels.wait()
    assert proxy.tunnels == set()
    assert isinstance(proxy.connections, Connections)
    await proxy.connections.until(keep_alive)
    assert (proxy.limiter.in_flight, proxy.limiter.queued) == (0, 0)
    proxy_dir = str(Path(__file__).resolve().parent.parent / "proxy")
    left = [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "cr_code", None) is not None
        and task.get_coro().cr_code.co_filename.startswith(proxy_dir)  # type: ignore[union-attr]
    ]
    assert left == []


# -- echo through the bundled example ----------------------------------------------------


async def test_echo_through_sync_with_aiohttp(tmp_path: Path, echo_port: int) -> None:
    async with (
        in_process_proxy(tmp_path, echo_port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(url + "/sync/ws", max_msg_size=0) as ws:
            assert proxy.connections == set()  # the socket now belongs to the tunnel
            assert len(proxy.tunnels) == 1
            # text and binary, sent back to back: they come back in the same order
            sent: list[str | bytes] = ["one", b"\x00two\xff", "three", b"", "", "é" * 1000]
            for message in sent:
                if isinstance(message, str):
                    await ws.send_str(message)
                else:
                    await ws.send_bytes(message)
            for message in sent:
                received = await ws.receive()
                kind = WSMsgType.TEXT if isinstance(message, str) else WSMsgType.BINARY
                assert (received.type, received.data) == (kind, message)
            # a large binary message both ways
            large = os.urandom(LARGE)
            await ws.send_bytes(large)
            assert await ws.receive_bytes() == large
        assert ws.close_code == 1000
        await no_leftovers(proxy)
        samples = await scrape(session, url)
    assert samples['model_proxy_websocket_messages_total{direction="client_to_upstream"}'] == 7
    assert samples['model_proxy_websocket_messages_total{direction="upstream_to_client"}'] == 7
    assert samples['model_proxy_requests_total{code="101",method="GET",route="sync"}'] == 1
    assert samples["model_proxy_websocket_connections"] == 0


async def test_echo_through_sync_with_the_websockets_library(
    tmp_path: Path, echo_port: int
) -> None:
    async with in_process_proxy(tmp_path, echo_port) as (proxy, url):
        async with client(ws_url(url, "/sync/ws"), max_size=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x01\x02")
            assert await ws.recv() == b"\x01\x02"
            # a message in fragments arrives whole
            await ws.send(["frag", "ment", "ed"])
            assert await ws.recv() == "fragmented"
            await ws.send([b"a" * 70000, b"b" * 10, b"c"])
            assert await ws.recv() == b"a" * 70000 + b"b" * 10 + b"c"
            large = "x" * LARGE  # compressed by permessage-deflate, which passes untouched
            await ws.send(large)
            assert await ws.recv() == large
            latency = await ws.ping(b"are you there")
            async with asyncio.timeout(5):
                await latency
        assert ws.close_code == 1000
        await no_leftovers(proxy)
        assert proxy.metrics.websocket_messages == {
            "client_to_upstream": 5,
            "upstream_to_client": 5,
        }


async def test_predict_is_a_websocket_when_the_predict_endpoint_is_one(
    tmp_path: Path, echo_port: int
) -> None:
    async with (
        in_process_proxy(tmp_path, echo_port, predict_endpoint="/ws") as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(url + "/predict") as ws:
            await ws.send_str("predict me")
            assert await ws.receive_str() == "predict me"
        async with client(ws_url(url, "/predict")) as ws2:
            await ws2.send(b"bytes")
            assert await ws2.recv() == b"bytes"
        await no_leftovers(proxy)
        samples = await scrape(session, url)
    assert samples['model_proxy_requests_total{code="101",method="GET",route="predict"}'] == 2


async def test_close_code_and_reason_of_the_server_reach_the_client(
    tmp_path: Path, echo_port: int
) -> None:
    async with (
        in_process_proxy(tmp_path, echo_port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(url + "/sync/ws") as ws:
            await ws.send_str("close:4001:going home")
            message = await ws.receive()
            assert (message.type, message.data, message.extra) == (
                WSMsgType.CLOSE,
                4001,
                "going home",
            )
        async with client(ws_url(url, "/sync/ws")) as ws2:
            await ws2.send("close:3000:")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws2.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (3000, "")
        await no_leftovers(proxy)


async def test_subprotocols_are_negotiated_with_the_model_server(
    tmp_path: Path, echo_port: int
) -> None:
    async with (
        in_process_proxy(tmp_path, echo_port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(url + "/sync/ws", protocols=("nope", "chat")) as ws:
            assert ws.protocol == "chat"
        async with client(ws_url(url, "/sync/ws"), subprotocols=[Subprotocol("echo")]) as ws2:
            assert ws2.subprotocol == "echo"
            await ws2.send("x")
            assert await ws2.recv() == "x"
        async with session.ws_connect(url + "/sync/ws") as ws3:
            assert ws3.protocol is None
        await no_leftovers(proxy)


async def test_a_refused_upstream_handshake_reaches_the_client_as_its_status(
    tmp_path: Path, echo_port: int
) -> None:
    async with (
        in_process_proxy(tmp_path, echo_port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with asyncio.timeout(5):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url + "/sync/no-such-route")
            assert refused.value.status == 404
            with pytest.raises(websockets.InvalidStatus) as invalid:
                await client(ws_url(url, "/sync/health"))  # not a WebSocket route: 200
            assert invalid.value.response.status_code == 200
            # the proxy is unharmed: the next upgrade works
            async with session.ws_connect(url + "/sync/ws") as ws:
                await ws.send_str("still here")
                assert await ws.receive_str() == "still here"
        await no_leftovers(proxy)
        samples = await scrape(session, url)
    assert samples['model_proxy_requests_total{code="404",method="GET",route="sync"}'] == 1


async def test_an_upgrade_while_not_ready_gets_503(tmp_path: Path, echo_port: int) -> None:
    async with (
        in_process_proxy(tmp_path, echo_port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        proxy.state.enter("starting", os.getpid())
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url + "/sync/ws")
        assert refused.value.status == 503
        assert refused.value.headers is not None
        assert refused.value.headers["Retry-After"] == "1"
        await no_leftovers(proxy)
        samples = await scrape(session, url)
    assert samples['model_proxy_rejected_requests_total{reason="not_ready"}'] == 1


# -- fake upstreams that record what they see ---------------------------------------------


class Recorder:
    """A WebSocket model server that records the handshake and every message it gets.
    Text `ping-me` makes it ping the client; `bye` makes it close with 4002; `greeting`
    is sent as soon as the handshake is done."""

    def __init__(self, greeting: str | None = None) -> None:
        self.greeting = greeting
        self.headers: CIMultiDictProxy[str] | None = None
        self.received: list[tuple[WSMsgType, Any, Any]] = []
        self.close_code: int | None = None
        self.opened = asyncio.Event()
        self.ended = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_get("/ws", self.websocket)
        self.app.router.add_get("/forbidden", self.forbidden)

    async def forbidden(self, request: web.Request) -> web.Response:
        return web.json_response({"denied": True}, status=403)

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.headers = request.headers
        ws = web.WebSocketResponse(protocols=("echo", "chat"), autoping=False)
        await ws.prepare(request)
        self.opened.set()
        if self.greeting is not None:
            await ws.send_str(self.greeting)
        try:
            while True:
                message = await ws.receive()
                self.received.append((message.type, message.data, message.extra))
                if message.type is WSMsgType.PING:
                    await ws.pong(message.data)
                elif message.type is WSMsgType.TEXT and message.data == "ping-me":
                    await ws.ping(b"from the server")
                elif message.type is WSMsgType.TEXT and message.data == "bye":
                    await ws.close(code=4002, message=b"server says bye")
                elif message.type is WSMsgType.TEXT:
                    await ws.send_str(message.data)
                elif message.type not in (WSMsgType.PONG, WSMsgType.BINARY):
                    break
        finally:
            self.close_code = ws.close_code
            self.ended.set()
        return ws


async def test_the_client_close_code_reaches_the_model_server(tmp_path: Path) -> None:
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(url + "/sync/ws") as ws:
            await ws.send_str("hi")
            assert await ws.receive_str() == "hi"
            await ws.close(code=4000, message=b"client done")
        async with asyncio.timeout(5):
            await recorder.ended.wait()
        assert recorder.received[-1] == (WSMsgType.CLOSE, 4000, "client done")
        assert recorder.close_code == 4000
        await no_leftovers(proxy)


async def test_pings_pass_both_ways(tmp_path: Path) -> None:
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(url + "/sync/ws", autoping=False) as ws:
            await ws.ping(b"from the client")
            pong = await ws.receive()
            assert (pong.type, pong.data) == (WSMsgType.PONG, b"from the client")
            await ws.send_str("ping-me")
            ping = await ws.receive()
            assert (ping.type, ping.data) == (WSMsgType.PING, b"from the server")
            await ws.pong(ping.data)
            await ws.send_str("after the pong")  # the server has read the pong by then
            assert await ws.receive_str() == "after the pong"
        async with asyncio.timeout(5):
            await recorder.ended.wait()
        kinds = [(kind, data) for kind, data, _ in recorder.received[:4]]
        assert kinds == [
            (WSMsgType.PING, b"from the client"),
            (WSMsgType.TEXT, "ping-me"),
            (WSMsgType.PONG, b"from the server"),
            (WSMsgType.TEXT, "after the pong"),
        ]
        await no_leftovers(proxy)
        # control frames are not messages
        assert proxy.metrics.websocket_messages == {
            "client_to_upstream": 2,
            "upstream_to_client": 1,
        }


async def test_the_upstream_handshake_carries_request_id_and_forwarded_headers(
    tmp_path: Path,
) -> None:
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(
            url + "/sync/ws", headers={"X-Request-ID": "ws-42"}, protocols=("chat",)
        ) as ws:
            assert ws.protocol == "chat"
            assert ws._response.headers.get("X-Request-ID") == "ws-42"
        assert recorder.headers is not None
        assert recorder.headers["X-Request-ID"] == "ws-42"
        assert recorder.headers["X-Forwarded-For"] == "127.0.0.1"
        assert recorder.headers["X-Forwarded-Proto"] == "http"
        assert recorder.headers["X-Forwarded-Host"] == url.removeprefix("http://")
        assert recorder.headers["Upgrade"].lower() == "websocket"
        assert recorder.headers["Sec-WebSocket-Protocol"] == "chat"
        generated = set()
        for _ in range(2):
            async with client(ws_url(url, "/sync/ws")) as ws2:
                assert ws2.response is not None
                returned = ws2.response.headers.get("X-Request-ID")
            assert recorder.headers["X-Request-ID"] == returned
            generated.add(returned)
        assert len(generated) == 2
        assert None not in generated
        await no_leftovers(proxy)


async def test_a_refused_handshake_with_a_body_is_passed_back(tmp_path: Path) -> None:
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with asyncio.timeout(5):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url + "/sync/forbidden")
            assert refused.value.status == 403
            with pytest.raises(websockets.InvalidStatus) as invalid:
                await client(ws_url(url, "/sync/forbidden"))
        assert invalid.value.response.status_code == 403
        assert invalid.value.response.body == b'{"denied": true}'
        await no_leftovers(proxy)


async def test_a_server_close_reaches_the_client_and_is_answered(tmp_path: Path) -> None:
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
    ):
        async with client(ws_url(url, "/sync/ws")) as ws:
            await ws.send("bye")
            async with asyncio.timeout(5):
                await ws.wait_closed()
        assert (ws.close_code, ws.close_reason) == (4002, "server says bye")
        async with asyncio.timeout(5):
            await recorder.ended.wait()
        assert recorder.close_code == 4002
        await no_leftovers(proxy)


# -- one side goes away --------------------------------------------------------------------


async def test_the_client_is_closed_when_the_model_server_dies(tmp_path: Path) -> None:
    async with (
        echo_server() as (echo, echo_port),
        in_process_proxy(tmp_path, echo_port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(url + "/sync/ws") as ws:
            await ws.send_str("alive")
            assert await ws.receive_str() == "alive"
            echo.kill()
            async with asyncio.timeout(5):
                message = await ws.receive()
            assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
        await no_leftovers(proxy)
        assert (await scrape(session, url))["model_proxy_websocket_connections"] == 0


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_the_model_server_sees_a_client_that_goes_away(tmp_path: Path, how: str) -> None:
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
    ):
        ws = await client(ws_url(url, "/sync/ws"))
        await ws.send("hi")
        assert await ws.recv() == "hi"
        # the client's socket ends without a closing handshake: a FIN or a reset
        getattr(ws.transport, how)()
        async with asyncio.timeout(5):
            await recorder.ended.wait()
            await ws.wait_closed()
        assert recorder.received[-1][0] in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
        await no_leftovers(proxy)


# -- shutdown --------------------------------------------------------------------------------


async def test_going_away_closes_both_sides_with_1001(tmp_path: Path) -> None:
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        async with client(ws_url(url, "/sync/ws")) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            [tunnel] = proxy.tunnels
            tunnel.going_away()
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(5):
                    await ws.recv()
            assert ws.close_code == 1001
        async with asyncio.timeout(5):
            await recorder.ended.wait()
        assert recorder.received[-1][:2] == (WSMsgType.CLOSE, 1001)
        await no_leftovers(proxy)
        assert (await scrape(session, url))["model_proxy_websocket_connections"] == 0


async def test_going_away_waits_for_a_message_half_sent(tmp_path: Path) -> None:
    """A close frame is never slipped into the middle of a frame on its way."""
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        try:
            writer.write(UPGRADE)
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            # in one write: the masked text "ok", then the header and 4 of the 10 bytes of
            # "0123456789"; once "ok" comes back, the proxy has read and passed on both
            writer.write(masked_text(b"ok") + masked_text(b"0123456789")[:10])
            async with asyncio.timeout(5):
                assert await reader.readexactly(4) == b"\x81\x02ok"
            [tunnel] = proxy.tunnels
            tunnel.going_away()
            async with asyncio.timeout(5):
                close = await reader.readexactly(23)  # the proxy's close frame to the client
            assert close == b"\x88\x15" + (1001).to_bytes(2, "big") + b"proxy shutting down"
            assert not recorder.ended.is_set()
            writer.write(masked_text(b"0123456789")[10:])  # the frame ends, then the close
            async with asyncio.timeout(5):
                await recorder.ended.wait()
            assert [kind for kind, _, _ in recorder.received] == [
                WSMsgType.TEXT,
                WSMsgType.TEXT,
                WSMsgType.CLOSE,
            ]
            assert recorder.received[1][1] == "0123456789"
            assert recorder.received[2][:2] == (WSMsgType.CLOSE, 1001)
        finally:
            writer.close()
        await no_leftovers(proxy)


UPGRADE = (
    b"GET /sync/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_frames_sent_before_the_101_are_passed_on_and_counted(tmp_path: Path) -> None:
    """A client may send its first frames right behind the upgrade request; one of them
    may even be cut by the end of the packet."""
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        try:
            early = masked_text(b"first") + masked_text(b"second")
            writer.write(UPGRADE + early[:15])  # "first" whole, "second" cut after 2 bytes
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101")
                assert await reader.readexactly(7) == b"\x81\x05first"
                writer.write(early[15:] + masked_text(b"third"))
                assert await reader.readexactly(8) == b"\x81\x06second"
                assert await reader.readexactly(7) == b"\x81\x05third"
            assert proxy.metrics.websocket_messages == {
                "client_to_upstream": 3,
                "upstream_to_client": 3,
            }
            # the proxy knows where frames end: its close lands between two of them
            [tunnel] = proxy.tunnels
            tunnel.going_away()
            async with asyncio.timeout(5):
                close = await reader.readexactly(23)
                await recorder.ended.wait()
            assert close[:4] == b"\x88\x15\x03\xe9"
            assert recorder.received[-1][:2] == (WSMsgType.CLOSE, 1001)
        finally:
            writer.close()
        await no_leftovers(proxy)


async def test_a_greeting_sent_with_the_101_reaches_the_client(tmp_path: Path) -> None:
    recorder = Recorder(greeting="welcome")
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
    ):
        async with client(ws_url(url, "/sync/ws")) as ws:
            assert await ws.recv() == "welcome"
            await ws.send("thanks")
            assert await ws.recv() == "thanks"
        await no_leftovers(proxy)
        assert proxy.metrics.websocket_messages == {
            "client_to_upstream": 1,
            "upstream_to_client": 2,
        }


def masked_text(payload: bytes) -> bytes:
    """A client's text frame (fin, masked), payload under 64 KiB."""
    mask = b"\x01\x02\x03\x04"
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    if len(payload) < 126:
        return bytes((0x81, 0x80 | len(payload))) + mask + body
    return bytes((0x81, 0x80 | 126)) + len(payload).to_bytes(2, "big") + mask + body


async def test_many_frames_sent_while_queued_arrive_once_admitted(tmp_path: Path) -> None:
    """Frames a client sends before its 101 are held (reading paused past a bound) while
    the upgrade waits for a slot, then passed on in order."""
    recorder = Recorder()
    async with (
        fake_upstream(recorder.app) as port,
        in_process_proxy(tmp_path, port, predict_concurrency=1) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):
        holder = await session.ws_connect(url + "/sync/ws")  # takes the only slot
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        try:
            payloads = [bytes([ord("a") + i]) * 60000 for i in range(20)]  # 1.2 MB
            writer.write(UPGRADE + b"".join(map(masked_text, payloads)))
            await metric_becomes(session, url, "model_proxy_requests_queued", 1)
            await holder.close()
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101")
                for payload in payloads:
                    assert await reader.readexactly(4) == b"\x81\x7e" + (60000).to_bytes(2, "big")
                    assert await reader.readexactly(60000) == payload
        finally:
            writer.close()
        await no_leftovers(proxy, keep_alive=1)  # the connection that scraped /metrics


async def test_sigterm_closes_open_websockets_with_1001(tmp_path: Path) -> None:
    async with run_proxy(write_config(tmp_path)) as running:
        async with client(ws_url(running.url, "/sync/ws")) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            running.signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(10):
                    await ws.recv()
        assert ws.close_code == 1001
        assert await running.exited() == 0
