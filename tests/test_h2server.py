"""One port, two protocols: the connection preface picks HTTP/2, anything else is HTTP/1.1;
/health, /ready and /metrics answer over HTTP/2 too, REST over HTTP/2 gets a clear error."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy.sniff import PREFACE

from .conftest import fake_upstream, free_port, in_process_proxy
from .h2peers import H2Client, grpc_request

SAFETY = 5.0


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_health_ready_and_metrics_answer_over_http2(tmp_path: Path) -> None:
    async with in_process_proxy(tmp_path, free_port()) as (proxy, url):
        client = await H2Client.connect(port_of(url))
        health = await client.get("/health")
        ready = await client.get("/ready")
        metrics = await client.get("/metrics")
        head = await client.get("/ready", method=b"HEAD")
        post = await client.get("/health", method=b"POST")
        proxy.state.enter("unready", proxy.state.pid)
        unready = await client.get("/ready")
        await client.close()
    assert health.status == 200
    assert json.loads(health.data)["ok"] is True
    assert health.header(b"content-type") == b"application/json"
    assert ready.status == 200
    assert metrics.status == 200
    assert b"# TYPE model_proxy_grpc_requests_total counter" in metrics.data
    assert int(metrics.header(b"content-length") or 0) == len(metrics.data)
    assert (head.status, bytes(head.data)) == (200, b"")
    assert post.status == 405
    assert post.header(b"allow") == b"GET, HEAD"
    assert unready.status == 503
    assert json.loads(unready.data)["state"] == "unready"


async def test_http1_and_http2_share_the_port(tmp_path: Path) -> None:
    async def predict(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/predict", predict)
    async with (
        fake_upstream(app) as upstream_port,
        in_process_proxy(tmp_path, upstream_port) as (_, url),
        aiohttp.ClientSession() as session,
    ):
        client = await H2Client.connect(port_of(url))
        async with session.post(url + "/predict", json={}) as response:
            assert response.status == 200
        assert (await client.get("/health")).status == 200
        async with session.get(url + "/health") as response:
            assert response.status == 200
        await client.close()


async def test_a_preface_split_over_many_reads_is_still_http2(tmp_path: Path) -> None:
    async with in_process_proxy(tmp_path, free_port()) as (proxy, url):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        for byte in PREFACE:
            writer.write(bytes([byte]))
            await writer.drain()
        async with asyncio.timeout(SAFETY):
            # the proxy's SETTINGS frame: type 0x4 on stream 0
            frame = await reader.readexactly(9)
        assert frame[3] == 0x4
        assert len(proxy.h2_connections) == 1
        writer.close()
        await writer.wait_closed()


async def test_http1_requests_starting_like_the_preface_stay_http1(tmp_path: Path) -> None:
    """Bytes that leave the preface ("PRI /", "POST" at its second byte) are HTTP/1.1's."""
    async with in_process_proxy(tmp_path, free_port()) as (proxy, url):
        answers = []
        for first in (b"PRI /health HTTP/1.1\r\n", b"POST /health HTTP/1.1\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
            writer.write(first + b"Host: x\r\nContent-Length: 0\r\n\r\n")
            async with asyncio.timeout(SAFETY):
                answers.append(await reader.readline())
            writer.close()
            await writer.wait_closed()
        assert not proxy.h2_connections
    # llhttp refuses the PRI method; POST to /health is not allowed
    assert answers == [b"HTTP/1.1 400 Bad Request\r\n", b"HTTP/1.1 405 Method Not Allowed\r\n"]


async def test_a_connection_that_sends_nothing_is_closed(tmp_path: Path) -> None:
    async with in_process_proxy(tmp_path, free_port()) as (proxy, url):
        proxy.limits = type(proxy.limits)(header_timeout=0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        async with asyncio.timeout(SAFETY):
            assert await reader.read() == b""  # closed by the proxy
        writer.close()
        await writer.wait_closed()
        assert not proxy.sniffing


async def test_rest_over_http2_gets_a_clear_error(tmp_path: Path) -> None:
    async with in_process_proxy(tmp_path, free_port()) as (_, url):
        client = await H2Client.connect(port_of(url))
        predict = await client.get("/predict", method=b"POST")
        sync = await client.get("/sync/v1/models")
        missing = await client.get("/elsewhere")
        await client.close()
    assert predict.status == 400
    assert json.loads(predict.data)["error"]["type"] == "bad_request"
    assert "HTTP/1.1" in json.loads(predict.data)["error"]["message"]
    assert sync.status == 400
    assert missing.status == 404
    assert json.loads(missing.data)["error"]["type"] == "not_found"


async def test_a_grpc_call_without_a_grpc_upstream_is_unimplemented(tmp_path: Path) -> None:
    async with in_process_proxy(tmp_path, free_port()) as (proxy, url):
        client = await H2Client.connect(port_of(url))
        reply = await client.reply(client.request(grpc_request(port_of(url), b"/a.B/C")))
        await client.close()
    assert reply.header_frames == 1  # trailers-only
    assert reply.status == 200
    assert reply.header(b"content-type") == b"application/grpc"
    assert reply.header(b"grpc-status") == b"12"
    assert b"grpc_upstream_port" in (reply.header(b"grpc-message") or b"")
    assert proxy.metrics.grpc_requests["UNIMPLEMENTED"] == 1


async def test_an_idle_http2_connection_gets_goaway_and_is_closed(tmp_path: Path) -> None:
    async with in_process_proxy(tmp_path, free_port()) as (proxy, url):
        proxy.limits = type(proxy.limits)(idle_timeout=0.2)
        client = await H2Client.connect(port_of(url))
        assert (await client.get("/health")).status == 200
        async with asyncio.timeout(SAFETY):
            await client.got_goaway.wait()
            await client.closed.wait()
        await client.close()
        assert client.goaway is not None
        assert client.goaway.error_code == 0
        assert not proxy.h2_connections
