"""Every way a client can hold a concurrency slot has a limit (issue 9): with one slot, a
slow client must never stop another client's request for long.

- a body up to buffer_request_body_bytes is read whole before the request asks for a slot:
  a client trickling it holds none;
- a client that takes none of the proxy's writes is cut after client_send_timeout_seconds,
  and the model server's request with it;
- a client that leaves as soon as it has what it wants (the OpenAI SDK after `data:
  [DONE]`) is counted with the status it got, not 499.
(An idle WebSocket: tests/test_websocket.py.)
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from aiohttp import web

from .conftest import fake_upstream, in_process_proxy
from .test_forward import connect, read_response, request, send

SAFETY = 10.0


class OneSlotModel:
    """/upload answers with the body's size; /predict answers at once; /flood streams
    until cancelled; /sse sends events, [DONE], then keeps the response open."""

    def __init__(self) -> None:
        self.uploads: list[int] = []
        self.flood_cancelled = asyncio.Event()
        self.sse_cancelled = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/upload", self.upload)
        self.app.router.add_post("/predict", self.predict)
        self.app.router.add_get("/flood", self.flood)
        self.app.router.add_get("/sse", self.sse)

    async def upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.uploads.append(len(body))
        return web.json_response({"bytes": len(body)})

    async def predict(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    async def flood(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            while True:
                await response.write(b"x" * 65536)
        except asyncio.CancelledError:
            self.flood_cancelled.set()
            raise

    async def sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for token in ("Hel", "lo"):
            await response.write(
                b'data: {"choices": [{"delta": {"content": "%s"}}]}\n\n' % token.encode()
            )
        await response.write(b"data: [DONE]\n\n")
        try:
            await asyncio.Event().wait()  # a server slow to end its response after [DONE]
        except asyncio.CancelledError:
            self.sse_cancelled.set()
            raise
        return response


async def test_a_body_trickled_slowly_holds_no_slot(tmp_path: Path) -> None:
    model = OneSlotModel()
    async with (
        fake_upstream(model.app, handler_cancellation=True) as port,
        in_process_proxy(tmp_path, port, predict_concurrency=1) as (proxy, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        for framing, first, last in [
            ([("Content-Length", "10")], b"a", b"bcdefghij"),
            ([("Transfer-Encoding", "chunked")], b"1\r\na\r\n", b"9\r\nbcdefghij\r\n0\r\n\r\n"),
        ]:
            writer.write(request("POST", "/sync/upload", framing) + first)
            await writer.drain()
            # the slow body is still coming: another client is served on the one slot
            other = await send(url, request("POST", "/sync/predict", body=b"{}"))
            assert other.status == 200
            assert proxy.limiter.in_flight == 0
            writer.write(last)
            response = await read_response(reader)
            assert (response.status, response.json()) == (200, {"bytes": 10})
    assert model.uploads == [10, 10]


async def test_a_client_that_reads_nothing_is_cut_and_frees_its_slot(tmp_path: Path) -> None:
    model = OneSlotModel()
    settings = {"client_send_timeout_seconds": 0.3}
    async with (
        fake_upstream(model.app, handler_cancellation=True) as port,
        in_process_proxy(tmp_path, port, predict_concurrency=1, proxy=settings) as (proxy, url),
        asyncio.timeout(SAFETY),
    ):
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        try:
            stalled.sendall(request("GET", "/sync/flood"))
            # it never reads: once its socket and the proxy's buffer are full, the stream
            # stalls; the next request waits for the slot until the stalled client is cut
            other = await send(url, request("POST", "/sync/predict", body=b"{}"))
            assert other.status == 200
            await model.flood_cancelled.wait()
        finally:
            stalled.close()
    assert proxy.metrics.client_disconnects["streaming"] == 1
    assert proxy.metrics.requests[("sync", "GET", 200)] == 1


async def test_a_client_leaving_after_done_is_counted_with_the_status_it_got(
    tmp_path: Path,
) -> None:
    """As the OpenAI SDK does: it closes once it has read `data: [DONE]`, before the
    server ended its response. nginx logs the 200 it sent; so does the proxy."""
    model = OneSlotModel()
    async with (
        fake_upstream(model.app, handler_cancellation=True) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        asyncio.timeout(SAFETY),
    ):
        for _ in range(5):
            model.sse_cancelled.clear()
            async with connect(url) as (reader, writer):
                writer.write(request("GET", "/sync/sse"))
                await reader.readuntil(b"data: [DONE]\n\n")
            await model.sse_cancelled.wait()  # the model server's request was cancelled
    assert proxy.metrics.requests == {("sync", "GET", 200): 5}
    assert proxy.metrics.client_disconnects == {"queued": 0, "waiting": 0, "streaming": 5}
