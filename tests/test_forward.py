"""Forwarding through real sockets: routes, methods, query strings, streaming both ways,
keep-alive and pipelining, the proxy's own errors, and clients that leave."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import fake_upstream, free_port, in_process_proxy

SAFETY = 5.0  # seconds: only a net for a hang, never a wait for something to happen

# -- a raw HTTP/1.1 client, for what a client library would hide --------------------------


class Response:
    """One response as it came off the socket."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.headers!r}, {self.body[:200]!r})"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def request(
    method: str,
    target: str | bytes,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    *,
    version: str = "1.1",
) -> bytes:
    """A request's bytes: `Host` first, `Content-Length` added when there is a body."""
    raw_target = target.encode() if isinstance(target, str) else target
    lines = [method.encode() + b" " + raw_target + b" HTTP/" + version.encode()]
    names = {name.lower() for name, _ in headers or []}
    if "host" not in names:
        lines.append(b"Host: proxy.test")
    lines += [f"{name}: {value}".encode() for name, value in headers or []]
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


async def read_response(reader: asyncio.StreamReader, *, method: str = "GET") -> Response:
    """The next final response (1xx skipped) on `reader`; its body by its framing, or
    up to EOF when it has none."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = [(name, value.strip()) for name, _, value in (x.partition(":") for x in lines)]
        if not 100 <= status < 200:
            break
    response = Response(status, headers, b"")
    if method == "HEAD" or status in (204, 304):
        return response
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        response.body = bytes(body)
    elif response.header("content-length") is not None:
        response.body = await reader.readexactly(int(response.header("content-length") or 0))
    else:
        response.body = await reader.read()
    return response


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()


async def send(url: str, raw: bytes, *, method: str = "GET") -> Response:
    """One request on a fresh connection; its response."""
    async with asyncio.timeout(SAFETY), connect(url) as (reader, writer):
        writer.write(raw)
        return await read_response(reader, method=method)


def error_type(response: Response) -> str:
    assert response.header("content-type") == "application/json", response
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    type_: str = body["error"]["type"]
    return type_


# -- fake model servers -------------------------------------------------------------------


class Recorder:
    """An upstream app that answers every path with what it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.connections: set[Any] = set()
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        assert request.transport is not None
        self.connections.add(request.transport.get_extra_info("peername"))
        seen = {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_length": len(body),
        }
        self.seen.append(seen)
        return web.json_response(seen)

    @property
    def targets(self) -> list[str]:
        return [seen["target"] for seen in self.seen]


@asynccontextmanager
async def raw_upstream(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A model server written byte by byte: `handle` runs per connection (then it is
    closed); yields its port and the connections it accepted."""
    accepted: list[asyncio.StreamWriter] = []
    tasks: set[asyncio.Task[Any]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port, accepted
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


# -- routes and methods -------------------------------------------------------------------


async def test_predict_goes_to_the_predict_endpoint(tmp_path: Path) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port, predict_endpoint="/v1/chat/completions") as (_, url),
    ):
        response = await send(url, request("POST", "/predict", body=b'{"x": 1}'))
        assert response.status == 200
        assert upstream.targets == ["/v1/chat/completions"]
        assert upstream.seen[0]["body_length"] == 8


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/predict", "/v1/models?api=2"),
        ("/predict?", "/v1/models?api=2"),
        ("/predict?b=1&b=2", "/v1/models?api=2&b=1&b=2"),
        ("/predict?api=3", "/v1/models?api=2&api=3"),
    ],
)
async def test_a_predict_endpoint_query_is_merged_with_the_clients(
    tmp_path: Path, target: str, expected: str
) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port, predict_endpoint="/v1/models?api=2") as (_, url),
    ):
        response = await send(url, request("GET", target))
        assert response.status == 200
        assert upstream.targets == [expected]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/sync/v1/models", "/v1/models"),
        ("/sync/a/b/", "/a/b/"),
        ("/sync", "/"),
        ("/sync/", "/"),
        ("/sync?x=1", "/?x=1"),
        ("/sync/?x=1", "/?x=1"),
        ("/sync/health", "/health"),
        ("/sync/predict", "/predict"),
    ],
)
async def test_sync_maps_onto_the_model_servers_paths(
    tmp_path: Path, target: str, expected: str
) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        response = await send(url, request("GET", target))
        assert response.status == 200
        assert upstream.targets == [expected]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
async def test_every_method_is_forwarded(tmp_path: Path, method: str) -> None:
    upstream = Recorder()
    body = None if method in ("GET", "HEAD", "OPTIONS") else b"payload"
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        async with asyncio.timeout(SAFETY), connect(url) as (reader, writer):
            # twice on one connection: a HEAD answer must not leave the proxy waiting for
            # a body that never comes
            for target in ("/sync/m", "/predict"):
                writer.write(request(method, target, body=body))
                response = await read_response(reader, method=method)
                assert response.status == 200
                if method == "HEAD":
                    assert response.body == b""
                    assert int(response.header("content-length") or 0) > 0
                else:
                    assert response.json()["method"] == method
        assert [(seen["method"], seen["target"]) for seen in upstream.seen] == [
            (method, "/m"),
            (method, "/predict"),
        ]
        if body is not None:
            assert upstream.seen[0]["body_length"] == len(body)


async def test_head_with_aiohttp_does_not_hang(tmp_path: Path) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        aiohttp.ClientSession() as session,
    ):
        for _ in range(3):
            async with asyncio.timeout(SAFETY), session.head(url + "/sync/x") as response:
                assert response.status == 200
                assert await response.read() == b""
        assert len(upstream.seen) == 3


QUERIES = [
    "?a=%2F&b=+&c=&d&a=1&a=2",
    "?q=hello%20world+and%2Bmore",
    "?",
    "?=",
    "?a==b&&c",
    "?path=/x/../y&next=?z",
    "?%2e%2e=%2F%2F&x=%zz",
    "?A=B&a=b&UPPER=%C3%A9",
    "?list[]=1&list[]=2&obj[k]=v",
    "?x=1;y=2&!$'()*,:@",
]


@pytest.mark.parametrize("query", QUERIES)
async def test_query_strings_pass_byte_for_byte(tmp_path: Path, query: str) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port, predict_endpoint="/v1/run") as (_, url),
    ):
        for target in (f"/sync/echo{query}", f"/predict{query}"):
            response = await send(url, request("GET", target))
            assert response.status == 200
        assert upstream.targets == [f"/echo{query}", f"/v1/run{query}"]


@pytest.mark.parametrize(
    "target", ["/", "/predictx", "/syncx", "/sync-x", "/Predict", "/SYNC/x", "/v1/models"]
)
async def test_other_paths_are_404_json(tmp_path: Path, target: str) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        async with asyncio.timeout(SAFETY), connect(url) as (reader, writer):
            writer.write(request("POST", target, body=b"abc") + request("GET", "/sync/after"))
            response = await read_response(reader)
            assert response.status == 404
            assert error_type(response) == "not_found"
            # the connection goes on
            after = await read_response(reader)
            assert after.status == 200
        assert upstream.targets == ["/after"]


async def test_post_to_health_is_405(tmp_path: Path) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        response = await send(url, request("POST", "/health", body=b"{}"))
        assert response.status == 405
        assert error_type(response) == "method_not_allowed"
        assert "GET" in (response.header("allow") or "")
        assert upstream.seen == []


# -- streaming responses ------------------------------------------------------------------


def gated_stream_app(
    content_type: str, events: list[bytes], gates: list[asyncio.Event]
) -> web.Application:
    """Sends events[0], then each next event only once the matching gate is set."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        await response.write(events[0])
        for gate, event in zip(gates, events[1:], strict=True):
            await gate.wait()
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/stream", stream)
    return app


STREAMS = {
    "sse": (
        "text/event-stream",
        b"\n\n",
        [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"],
    ),
    "ndjson": ("application/x-ndjson", b"\n", [b'{"n": 1}\n', b'{"n": 2}\n', b'{"n": 3}\n']),
    "chunked": ("application/octet-stream", b"|", [b"first|", b"second|", b"third|"]),
}


@pytest.mark.parametrize("kind", sorted(STREAMS))
async def test_a_stream_reaches_the_client_event_by_event(tmp_path: Path, kind: str) -> None:
    content_type, separator, events = STREAMS[kind]
    gates = [asyncio.Event() for _ in events[1:]]
    async with (
        fake_upstream(gated_stream_app(content_type, events, gates)) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        aiohttp.ClientSession() as session,
        session.get(url + "/sync/stream") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"] == content_type
        assert response.headers["Transfer-Encoding"] == "chunked"
        for index, event in enumerate(events):
            # the upstream may not send event k+1 before the client has read event k
            async with asyncio.timeout(SAFETY):
                assert await response.content.readuntil(separator) == event
            if index < len(gates):
                gates[index].set()
        async with asyncio.timeout(SAFETY):
            assert await response.read() == b""


async def test_a_close_delimited_stream_is_not_buffered(tmp_path: Path) -> None:
    gate = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
        await gate.wait()
        writer.write(b"data: 2\n\n")
        await writer.drain()

    async with (
        raw_upstream(handle) as (port, _),
        in_process_proxy(tmp_path, port) as (_, url),
        aiohttp.ClientSession() as session,
        session.get(url + "/sync/stream") as response,
    ):
        async with asyncio.timeout(SAFETY):
            assert await response.content.readuntil(b"\n\n") == b"data: 1\n\n"
        gate.set()
        async with asyncio.timeout(SAFETY):
            assert await response.content.readuntil(b"\n\n") == b"data: 2\n\n"
            assert await response.read() == b""


async def test_content_length_passes_through(tmp_path: Path) -> None:
    body = bytes(range(256)) * 40

    async def fixed(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/fixed", fixed)
    async with fake_upstream(app) as port, in_process_proxy(tmp_path, port) as (_, url):
        response = await send(url, request("GET", "/sync/fixed"))
        assert response.status == 200
        assert response.header("content-length") == str(len(body))
        assert response.header("transfer-encoding") is None
        assert response.body == body


@pytest.mark.parametrize("client_version", ["1.1", "1.0"])
async def test_a_close_delimited_response_arrives_complete(
    tmp_path: Path, client_version: str
) -> None:
    body = b"no length, no chunks: the end is the close\n" * 1000

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + body)
        await writer.drain()

    async with (
        raw_upstream(handle) as (port, accepted),
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        for _ in range(2 if client_version == "1.1" else 1):
            writer.write(request("GET", "/sync/old", version=client_version))
            response = await read_response(reader)
            assert response.status == 200
            assert response.body == body
        if client_version == "1.1":
            # re-framed as chunks, so the client connection stays usable
            assert response.header("transfer-encoding") == "chunked"
            assert len(accepted) == 2
        else:
            assert response.header("connection") == "close"
            assert await reader.read() == b""


async def test_a_large_download_is_complete_and_exact(tmp_path: Path) -> None:
    size = 50 * 1024 * 1024
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB

    async def download(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("length"):
            response.content_length = size
        await response.prepare(request)
        for _ in range(size // len(block)):
            await response.write(block)
        await response.write_eof()
        return response

    expected = hashlib.sha256(block * (size // len(block))).hexdigest()
    app = web.Application()
    app.router.add_get("/download", download)
    async with (
        fake_upstream(app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        aiohttp.ClientSession() as session,
    ):
        for query in ("", "?length=1"):
            digest = hashlib.sha256()
            received = 0
            async with asyncio.timeout(30), session.get(url + "/sync/download" + query) as response:
                assert response.status == 200
                async for piece in response.content.iter_any():
                    digest.update(piece)
                    received += len(piece)
            assert received == size
            assert digest.hexdigest() == expected


# -- streaming request bodies -------------------------------------------------------------


async def test_a_chunked_upload_streams_to_the_model_server(tmp_path: Path) -> None:
    """Past buffer_request_body_bytes, a body goes on as it comes (tests/test_slow_clients.py:
    a smaller one is held whole first)."""
    first, second = b"a" * 10_000, b"b" * 5_000
    got_first = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        assert request.headers["Transfer-Encoding"] == "chunked"
        assert await request.content.readexactly(len(first)) == first
        got_first.set()
        rest = await request.content.read()
        return web.json_response({"rest": len(rest), "ok": rest == second})

    app = web.Application()
    app.router.add_post("/upload", upload)
    async with (
        fake_upstream(app) as port,
        in_process_proxy(tmp_path, port, proxy={"buffer_request_body_bytes": 1000}) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        writer.write(
            request("POST", "/sync/upload", [("Transfer-Encoding", "chunked")])
            + b"%x\r\n%s\r\n" % (len(first), first)
        )
        await got_first.wait()  # before the client has sent the rest
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second))
        response = await read_response(reader)
        assert response.status == 200
        assert response.json() == {"rest": len(second), "ok": True}


async def test_a_large_upload_arrives_exact(tmp_path: Path) -> None:
    payload = hashlib.sha256(b"upload").digest() * (20 * 1024 * 1024 // 32)

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for piece in request.content.iter_any():
            digest.update(piece)
            size += len(piece)
        return web.json_response(
            {"bytes": size, "sha256": digest.hexdigest(), "length": request.content_length}
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/upload", upload)
    async with (
        fake_upstream(app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        aiohttp.ClientSession() as session,
        asyncio.timeout(30),
        session.post(url + "/sync/upload", data=io.BytesIO(payload)) as response,
    ):
        assert response.status == 200
        assert await response.json() == {
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "length": len(payload),
        }


async def test_expect_100_continue_is_answered(tmp_path: Path) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        head = request("PUT", "/sync/x", [("Expect", "100-continue"), ("Content-Length", "5")])
        writer.write(head)
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        response = await read_response(reader)
        assert response.status == 200
        assert response.json()["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


# -- keep-alive and pipelining ------------------------------------------------------------


async def test_sequential_requests_reuse_one_upstream_connection(tmp_path: Path) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        for index in range(5):
            writer.write(request("POST", f"/sync/{index}", body=b"x" * index))
            response = await read_response(reader)
            assert response.status == 200
        assert upstream.targets == [f"/{index}" for index in range(5)]
        assert len(upstream.connections) == 1


async def test_separate_clients_share_pooled_upstream_connections(tmp_path: Path) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        for index in range(4):
            assert (await send(url, request("GET", f"/sync/{index}"))).status == 200
        assert len(upstream.connections) == 1


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()
    order: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        order.append(request.path)
        body = await request.read()
        if request.path == "/slow":
            entered.set()
            await release.wait()
        return web.json_response({"path": request.path, "body": body.decode()})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with (
        fake_upstream(app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        writer.write(
            request("GET", "/sync/slow")
            + request("POST", "/sync/two", body=b"2")
            + request("POST", "/sync/three", [("Transfer-Encoding", "chunked")])
            + chunked(b"th", b"ree")
            + request("GET", "/nowhere")
            + request("GET", "/sync/five")
        )
        await entered.wait()
        assert order == ["/slow"]  # the others wait their turn
        release.set()
        answers = [await read_response(reader) for _ in range(5)]
        assert [answer.status for answer in answers] == [200, 200, 200, 404, 200]
        assert [answer.json().get("path") for answer in answers if answer.status == 200] == [
            "/slow",
            "/two",
            "/three",
            "/five",
        ]
        assert answers[2].json()["body"] == "three"
        assert order == ["/slow", "/two", "/three", "/five"]


async def test_an_upstream_that_closes_every_connection(tmp_path: Path) -> None:
    async def handle(request: web.Request) -> web.Response:
        response = web.json_response({"path": request.path})
        response.force_close()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with (
        fake_upstream(app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        for index in range(5):
            writer.write(request("GET", f"/sync/{index}"))
            response = await read_response(reader)
            assert response.status == 200
            assert response.json() == {"path": f"/{index}"}
            assert response.header("connection") is None  # the client's connection stays


async def test_an_upstream_with_a_short_keepalive_timeout(tmp_path: Path) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app, keepalive_timeout=0.001) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        for index in range(20):
            writer.write(request("GET", f"/sync/{index}"))
            response = await read_response(reader)
            assert response.status == 200, response
        assert len(upstream.seen) == 20


async def test_a_request_on_a_stale_pooled_connection_is_resent(tmp_path: Path) -> None:
    """The model server answers one request per connection, then closes the connection
    when the next request arrives, unanswered (an idle close racing a reuse)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request_head(reader)

    async with (
        raw_upstream(handle) as (port, accepted),
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        for _ in range(3):
            writer.write(request("GET", "/sync/x"))
            response = await read_response(reader)
            assert (response.status, response.body) == (200, b"ok")
        assert len(accepted) == 3


# -- errors -------------------------------------------------------------------------------


async def test_nothing_listening_is_502(tmp_path: Path) -> None:
    async with in_process_proxy(tmp_path, free_port()) as (proxy, url):
        response = await send(url, request("GET", "/sync/x", [("X-Request-ID", "abc")]))
        assert response.status == 502
        assert error_type(response) == "upstream_unavailable"
        assert response.header("x-request-id") == "abc"
        assert proxy.metrics.requests == {("sync", "GET", 502): 1}


@pytest.mark.parametrize("answer", [b"", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-"])
async def test_an_upstream_that_closes_before_answering_is_502(
    tmp_path: Path, answer: bytes
) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(answer)
        await writer.drain()

    async with raw_upstream(handle) as (port, _), in_process_proxy(tmp_path, port) as (_, url):
        response = await send(url, request("GET", "/sync/x"))
        assert response.status == 502
        assert error_type(response) == "upstream_unavailable"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n80\r\n",
    ],
)
async def test_a_cut_stream_reaches_the_client_as_an_error(tmp_path: Path, head: bytes) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(head + b"x" * 100)
        await writer.drain()

    async with (
        raw_upstream(handle) as (port, _),
        in_process_proxy(tmp_path, port) as (proxy, url),
        aiohttp.ClientSession() as session,
        asyncio.timeout(SAFETY),
        session.get(url + "/sync/cut") as response,
    ):
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
        assert sum(proxy.metrics.requests.values()) == 1


async def test_no_response_start_in_time_is_504(tmp_path: Path) -> None:
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/stall", stall)
    async with (
        fake_upstream(app, handler_cancellation=True) as port,
        in_process_proxy(tmp_path, port, proxy={"request_timeout_seconds": 0.2}) as (proxy, url),
    ):
        response = await send(url, request("GET", "/sync/stall"))
        assert response.status == 504
        assert error_type(response) == "upstream_timeout"
        async with asyncio.timeout(SAFETY):
            await cancelled.wait()  # the model server's work is cancelled too
        assert proxy.metrics.requests == {("sync", "GET", 504): 1}


async def test_a_stream_that_started_in_time_is_not_cut_by_the_request_timeout(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    never = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: early\n\n")
        await gate.wait()
        await response.write(b"data: late\n\n")
        await response.write_eof()
        return response

    async def stall(request: web.Request) -> web.Response:
        await never.wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/stall", stall)
    async with (
        fake_upstream(app, handler_cancellation=True) as port,
        in_process_proxy(tmp_path, port, proxy={"request_timeout_seconds": 0.2}) as (_, url),
        aiohttp.ClientSession() as session,
        session.get(url + "/sync/stream") as response,
    ):
        async with asyncio.timeout(SAFETY):
            assert await response.content.readuntil(b"\n\n") == b"data: early\n\n"
        # a request sent now times out only once more than the timeout has passed since
        # the stream began: a clock without sleeping
        stalled = await send(url, request("GET", "/sync/stall"))
        assert stalled.status == 504
        gate.set()
        async with asyncio.timeout(SAFETY):
            assert await response.read() == b"data: late\n\n"


async def test_a_body_too_large_by_content_length_is_413_at_once(tmp_path: Path) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port, proxy={"max_request_body_bytes": 1000}) as (proxy, url),
    ):
        for expect in ([("Expect", "100-continue")], []):
            # the head alone: the answer must not wait for a body the client holds back
            head = request("POST", "/predict", [*expect, ("Content-Length", "1001")])
            response = await send(url, head)
            assert response.status == 413
            assert error_type(response) == "payload_too_large"
            assert response.header("connection") == "close"
        # exactly the limit is fine
        fits = await send(url, request("POST", "/predict", body=b"x" * 1000))
        assert fits.status == 200
        assert len(upstream.seen) == 1
        assert proxy.metrics.rejected == {"payload_too_large": 2}


async def test_a_chunked_body_growing_past_the_limit_is_413(tmp_path: Path) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port, proxy={"max_request_body_bytes": 1000}) as (proxy, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        writer.write(
            request("POST", "/sync/up", [("Transfer-Encoding", "chunked")])
            + b"258\r\n"
            + b"x" * 600
            + b"\r\n"
        )
        writer.write(b"258\r\n" + b"y" * 600 + b"\r\n")  # 1200 > 1000, and the end never comes
        response = await read_response(reader)
        assert response.status == 413
        assert error_type(response) == "payload_too_large"
        assert response.header("connection") == "close"
        assert upstream.seen == []  # what it had of the body was never a whole request
        assert proxy.metrics.rejected == {"payload_too_large": 1}


async def test_an_oversized_pipelined_body_is_answered_in_turn(tmp_path: Path) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with (
        fake_upstream(app) as port,
        in_process_proxy(tmp_path, port, proxy={"max_request_body_bytes": 10}) as (proxy, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        writer.write(
            request("GET", "/sync/first")
            + request("POST", "/sync/big", [("Transfer-Encoding", "chunked")])
            + chunked(b"0123456789", b"abc")
            + request("POST", "/sync/big2", body=b"0123456789abc")
        )
        await entered.wait()
        release.set()
        first = await read_response(reader)
        assert (first.status, first.json()) == (200, {"path": "/first"})
        second = await read_response(reader)
        assert second.status == 413
        third = await read_response(reader)
        assert third.status == 413
        assert proxy.limiter.in_flight == 0


async def test_not_ready_is_503_with_retry_after(tmp_path: Path) -> None:
    upstream = Recorder()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
    ):
        proxy.state.enter("starting", None)
        for target in ("/predict", "/sync/x"):
            response = await send(url, request("POST", target, body=b"{}"))
            assert response.status == 503
            assert error_type(response) == "not_ready"
            assert (response.header("retry-after") or "").isdigit()
            assert len(response.header("x-request-id") or "") == 32  # identified, though refused
        kept = await send(url, request("GET", "/sync/x", [("X-Request-ID", "mine-1")]))
        assert (kept.status, kept.header("x-request-id")) == (503, "mine-1")
        assert upstream.seen == []
        assert proxy.metrics.requests == {
            ("predict", "POST", 503): 1,
            ("sync", "POST", 503): 1,
            ("sync", "GET", 503): 1,
        }
        assert proxy.metrics.rejected == {"not_ready": 3}
        proxy.state.enter("ready", 1)
        assert (await send(url, request("GET", "/sync/x"))).status == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
        b"GET /sync/x HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /sync/x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET\x00 / HTTP/1.1\r\n\r\n",
    ],
)
async def test_malformed_http_is_400_json(tmp_path: Path, raw: bytes) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        async with asyncio.timeout(SAFETY), connect(url) as (reader, writer):
            writer.write(raw)
            response = await read_response(reader)
            assert response.status == 400
            assert error_type(response) == "bad_request"
            assert await reader.read() == b""  # and the connection is closed
        assert upstream.seen == []


async def test_a_malformed_body_after_a_good_head_ends_the_exchange(tmp_path: Path) -> None:
    """The head already went to the model server (bodies stream here): the client gets 400,
    as nothing was answered yet, and the model server's request is cut."""
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def upload(request: web.Request) -> web.Response:
        entered.set()
        try:
            await request.read()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="read it all")

    app = web.Application()
    app.router.add_post("/upload", upload)
    async with (
        fake_upstream(app, handler_cancellation=True) as port,
        in_process_proxy(tmp_path, port, proxy={"buffer_request_body_bytes": 0}) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        writer.write(request("POST", "/sync/upload", [("Transfer-Encoding", "chunked")]))
        writer.write(b"3\r\nabc\r\n")
        await entered.wait()
        writer.write(b"zz\r\n")  # not a chunk size
        response = await read_response(reader)
        assert response.status == 400
        assert error_type(response) == "bad_request"
        assert response.header("connection") == "close"
        assert await reader.read() == b""
        await cancelled.wait()


async def test_a_request_line_over_8_kib_is_414(tmp_path: Path) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        fits = await send(url, request("GET", "/sync/x?" + "a" * 8000))
        assert fits.status == 200
        response = await send(url, request("GET", "/sync/x?" + "a" * 9000))
        assert response.status == 414
        assert error_type(response) == "uri_too_long"
        assert len(upstream.seen) == 1


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Big", "v" * 9000)],
        [(f"X-Many-{index}", "v" * 1000) for index in range(100)],  # 100 KB in all
    ],
    ids=["one-header", "many-headers"],
)
async def test_headers_that_are_too_large_are_431(
    tmp_path: Path, headers: list[tuple[str, str]]
) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        fits = await send(url, request("GET", "/sync/x", [("X-Big", "v" * 8000)]))
        assert fits.status == 200
        response = await send(url, request("GET", "/sync/x", headers))
        assert response.status == 431
        assert error_type(response) == "headers_too_large"
        assert len(upstream.seen) == 1


async def test_an_unfinished_head_over_64_kib_is_431(tmp_path: Path) -> None:
    """httptools holds an incomplete head in memory: it must not grow without bound."""
    async with in_process_proxy(tmp_path, free_port()) as (_, url):
        lines = b"".join(b"X-Part-%d: %s\r\n" % (index, b"v" * 1000) for index in range(100))
        response = await send(url, b"GET /sync/x HTTP/1.1\r\n" + lines)  # never ends
        assert response.status == 431


# -- upgrades that are not WebSockets, and refused WebSockets ------------------------------


@pytest.mark.parametrize(
    "body_headers",
    [[], [("Content-Length", "5")], [("Transfer-Encoding", "chunked")]],
    ids=["no-body", "content-length", "chunked"],
)
async def test_an_upgrade_the_proxy_does_not_take_stays_http(
    tmp_path: Path, body_headers: list[tuple[str, str]]
) -> None:
    """h2c and friends are ignored (RFC 9110 §7.8): the body is forwarded as a body and
    the next request is parsed as a request, never written raw to the model server."""
    upstream = Recorder()
    body = b"" if not body_headers else b"hello"
    framed = chunked(body) if ("Transfer-Encoding", "chunked") in body_headers else body
    upgrade = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c")]
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        writer.write(
            request("POST", "/sync/first", [*upgrade, ("HTTP2-Settings", "AAA"), *body_headers])
            + framed
            + request("GET", "/sync/second")
        )
        first = await read_response(reader)
        assert first.status == 200
        assert first.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
        sent = {name.lower() for name, _ in first.json()["headers"]}
        assert not sent & {"upgrade", "http2-settings", "connection"}
        second = await read_response(reader)
        assert second.status == 200
        assert [seen["target"] for seen in upstream.seen] == ["/first", "/second"]
        assert len(upstream.connections) == 1


async def test_bytes_after_a_refused_websocket_upgrade_never_reach_the_model_server(
    tmp_path: Path,
) -> None:
    upstream = Recorder()  # answers 200: it refuses the upgrade
    upgrade = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        async with asyncio.timeout(SAFETY), connect(url) as (reader, writer):
            writer.write(request("GET", "/sync/ws", upgrade) + request("GET", "/sync/smuggled"))
            response = await read_response(reader)
            assert response.status == 200
            assert response.header("connection") == "close"
            assert await reader.read() == b""
        # the next client, on the pooled connection, gets its own answer
        assert (await send(url, request("GET", "/sync/next"))).json()["target"] == "/next"
        assert upstream.targets == ["/ws", "/next"]
        assert len(upstream.connections) == 1


# -- clients that leave -------------------------------------------------------------------


async def test_a_client_that_leaves_cancels_the_upstream_request(tmp_path: Path) -> None:
    entered = asyncio.Event()
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def generate(request: web.Request) -> web.Response:
        entered.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/v1/generate", generate)
    async with (
        fake_upstream(app, handler_cancellation=True) as port,
        in_process_proxy(tmp_path, port, predict_endpoint="/v1/generate") as (proxy, url),
    ):
        async with asyncio.timeout(SAFETY):
            async with connect(url) as (_, writer):
                writer.write(request("POST", "/predict", body=b"{}"))
                await entered.wait()
            await cancelled.wait()
        assert proxy.metrics.requests == {("predict", "POST", 499): 1}
        assert proxy.limiter.in_flight == 0


async def test_a_client_that_leaves_mid_stream_cancels_the_stream(tmp_path: Path) -> None:
    never = asyncio.Event()
    cancelled = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return response

    app = web.Application()
    app.router.add_get("/stream", stream)
    async with (
        fake_upstream(app, handler_cancellation=True) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
    ):
        async with asyncio.timeout(SAFETY):
            async with connect(url) as (reader, writer):
                writer.write(request("GET", "/sync/stream"))
                await reader.readuntil(b"data: 1\n\n")
            await cancelled.wait()
        # the head went out: the status sent is what the client got, as nginx logs it
        assert proxy.metrics.requests == {("sync", "GET", 200): 1}
        assert proxy.metrics.client_disconnects == {"queued": 0, "waiting": 0, "streaming": 1}
