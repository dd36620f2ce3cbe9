"""Request smuggling, attacked with a strict parser behind the proxy.

The invariant (proxy/framing.py): no byte a client sends after a request head reaches the
model server except as that request's re-framed body, or inside a WebSocket tunnel the
model server accepted with 101; a connection to the model server is reused only after a
complete request and a complete response. The property test sends generated request
streams — valid, ambiguous and hostile shapes, split at random points — through the proxy
to an h11 server (tests/strict_upstream.py) and checks that what h11 parsed is exactly the
requests the proxy accepted, in order, bodies byte for byte: no more, no less. The tests
after it are the findings of issue 9, one each, on raw sockets.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .conftest import in_process_proxy
from .strict_upstream import StrictUpstream, strict_upstream
from .test_forward import Response, connect, error_type

SAFETY = 5.0

# a body that is itself a request: it must reach the model server as bytes of a body
SMUGGLE = (
    b"POST /sync/echo HTTP/1.1\r\nHost: x\r\nX-Request-ID: evil\r\nContent-Length: 4\r\n\r\nevil"
)


@dataclass(frozen=True)
class Item:
    """One request of a stream and what the proxy must do with it:
    ok (forwarded, answered by the model server), close (the same, then the connection
    closes), ws (a WebSocket handshake: forwarded; 101 makes a tunnel, else the connection
    closes) or refused (the proxy's own `status`, then the connection closes)."""

    raw: bytes
    kind: str
    request_id: bytes = b""
    body: bytes = b""
    method: bytes = b"GET"
    status: int = 0

    @property
    def terminal(self) -> bool:
        return self.kind != "ok"


def head(method: bytes, lines: list[bytes], target: bytes = b"/sync/echo") -> bytes:
    return b"\r\n".join([method + b" " + target + b" HTTP/1.1", *lines]) + b"\r\n\r\n"


def chunks(body: bytes, cuts: list[int], extension: bytes) -> bytes:
    edges = sorted({0, len(body), *(cut % (len(body) + 1) for cut in cuts)})
    parts = [body[a:b] for a, b in pairwise(edges) if b > a]
    return b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in parts) + b"0\r\n\r\n"


BODIES = st.one_of(st.binary(max_size=200), st.just(SMUGGLE))
METHODS = st.sampled_from([b"POST", b"PUT", b"PATCH"])


@st.composite
def ok_items(draw: st.DrawFn, index: int) -> Item:
    rid = b"r%d" % index
    host = b"Host: proxy.test"
    ident = b"X-Request-ID: " + rid
    shape = draw(
        st.sampled_from(
            ["get", "length", "chunked", "h2c", "post-upgrade", "no-connection-upgrade", "expect"]
        )
    )
    body = draw(BODIES)
    method = draw(METHODS)
    if shape == "get":
        return Item(head(b"GET", [host, ident]), "ok", rid)
    if shape == "h2c":  # an Upgrade the proxy ignores: HTTP/1.1 goes on
        lines = [host, ident, b"Connection: Upgrade, HTTP2-Settings", b"Upgrade: h2c"]
        return Item(head(b"GET", [*lines, b"HTTP2-Settings: AAMAAABkAAQAAP__"]), "ok", rid)
    if shape == "no-connection-upgrade":  # Upgrade without Connection: upgrade proposes nothing
        lines = [host, ident, b"Upgrade: websocket", b"Connection: keep-alive"]
        return Item(head(b"GET", lines), "ok", rid)
    framing: list[bytes]
    if shape == "chunked" or (shape == "post-upgrade" and draw(st.booleans())):
        spelling = draw(st.sampled_from([b"chunked", b"Chunked", b" chunked", b"CHUNKED"]))
        extension = draw(st.sampled_from([b"", b";a=b", b';name="quoted"']))
        framing = [b"Transfer-Encoding: " + spelling]
        payload = chunks(body, draw(st.lists(st.integers(0, 400), max_size=4)), extension)
    else:
        framing = [b"Content-Length: %d" % len(body)]
        payload = body
    extra: list[bytes] = []
    if shape == "post-upgrade":  # a WebSocket Upgrade on a POST: ignored, the body is read
        extra = [b"Connection: Upgrade", b"Upgrade: websocket"]
    elif shape == "expect":
        extra = [b"Expect: 100-continue"]
    lines = [host, ident, *extra, *framing]
    return Item(head(method, lines) + payload, "ok", rid, body, method)


@st.composite
def close_items(draw: st.DrawFn, index: int) -> Item:
    rid = b"r%d" % index
    connection = draw(st.sampled_from([b"close", b"close, Host", b"Close, Content-Length"]))
    body = draw(BODIES)
    lines = [b"Host: proxy.test", b"X-Request-ID: " + rid, b"Connection: " + connection]
    raw = head(b"POST", [*lines, b"Content-Length: %d" % len(body)]) + body
    return Item(raw, "close", rid, body, b"POST")


@st.composite
def websocket_items(draw: st.DrawFn, index: int) -> Item:
    rid = b"r%d" % index
    upgrade = draw(st.sampled_from([b"websocket", b"WebSocket", b"websocket ", b"websocket\t"]))
    connection = draw(st.sampled_from([b"Upgrade", b"keep-alive, Upgrade", b"upgrade "]))
    lines = [
        b"Host: proxy.test",
        b"X-Request-ID: " + rid,
        b"Connection: " + connection,
        b"Upgrade: " + upgrade,
        b"Sec-WebSocket-Version: 13",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ]
    return Item(head(b"GET", lines, b"/sync/ws"), "ws", rid)


WEBSOCKET_WITH_BODY = [
    b"Connection: Upgrade",
    b"Upgrade: websocket ",
    b"Sec-WebSocket-Version: 13",
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
]
REFUSED = [
    (b"CONNECT /sync/echo HTTP/1.1\r\nHost: proxy.test\r\n\r\n", 405),
    (b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n", 405),
    (b"CONNECT http://proxy.test/sync/echo HTTP/1.1\r\nHost: proxy.test\r\n\r\n", 405),
    (head(b"GET", [b"Host: a", *WEBSOCKET_WITH_BODY, b"Content-Length: 4"]) + b"abcd", 400),
    (
        head(b"GET", [b"Host: a", *WEBSOCKET_WITH_BODY, b"Transfer-Encoding: chunked"])
        + b"4\r\nabcd\r\n0\r\n\r\n",
        400,
    ),
    (head(b"POST", [b"Host: a", b"Content-Length: 4", b"Transfer-Encoding: chunked"]), 400),
    (head(b"POST", [b"Host: a", b"Transfer-Encoding: chunked", b"Content-Length: 4"]), 400),
    (head(b"POST", [b"Host: a", b"Transfer-Encoding: gzip, chunked"]) + b"0\r\n\r\n", 400),
    (head(b"POST", [b"Host: a", b"Transfer-Encoding: chunked, chunked"]) + b"0\r\n\r\n", 400),
    (head(b"POST", [b"Host: a", b"Transfer-Encoding: chunked", b"Transfer-Encoding: x"]), 400),
    (head(b"POST", [b"Host: a", b"Content-Length: 2", b"Content-Length: 2"]) + b"ab", 400),
    (head(b"POST", [b"Host: a", b"Content-Length: 2, 2"]) + b"ab", 400),
    (head(b"POST", [b"Host: a", b"Content-Length: +2"]) + b"ab", 400),
    (head(b"GET", [b"X-No-Host: 1"]), 400),
    (head(b"GET", [b"Host: a", b"Host: b"]), 400),
    (head(b"POST", [b"Host: a", b"Transfer-Encoding: chunked"]) + b"zz\r\nab\r\n0\r\n\r\n", 400),
    (b"GET /sync/echo HTTP/1.2\r\nHost: a\r\n\r\n", 400),
    (b"GET /sync/echo\r\n\r\n", 400),
    (head(b"GET", [b"Host: a", b"X-Folded: one", b" two"]), 400),
    (head(b"GET", [b"Host : a"]), 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
]


def refused_items() -> st.SearchStrategy[Item]:
    return st.sampled_from(REFUSED).map(lambda pair: Item(pair[0], "refused", status=pair[1]))


@st.composite
def streams(draw: st.DrawFn) -> list[Item]:
    """Requests to send on one connection, in order; a close at the end, so the proxy ends
    it. What follows a terminal item is sent too: it must never reach the model server as
    requests of its own."""
    items: list[Item] = []
    for index in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["ok", "ok", "ok", "close", "ws", "refused"]))
        if kind == "ok":
            items.append(draw(ok_items(index)))
        elif kind == "close":
            items.append(draw(close_items(index)))
        elif kind == "ws":
            items.append(draw(websocket_items(index)))
        else:
            items.append(draw(refused_items()))
    items.append(draw(close_items(len(items))))
    return items


async def read_head(reader: asyncio.StreamReader) -> Response:
    """The next response head on `reader` (a 100 Continue skipped, a 101 returned)."""
    while True:
        raw = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines)]
        if status != 100:
            return Response(status, headers, b"")


async def read_answer(reader: asyncio.StreamReader) -> Response:
    response = await read_head(reader)
    if response.status == 101:
        return response
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        response.body = bytes(body)
    else:
        response.body = await reader.readexactly(int(response.header("content-length") or 0))
    return response


async def exchange(url: str, items: list[Item], cuts: list[int]) -> list[Item]:
    """Send every item's bytes on one connection, cut into writes at `cuts`; check each
    answer up to the first terminal item; the items the model server must have seen."""
    stream = b"".join(item.raw for item in items)
    edges = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    accepted: list[Item] = []
    async with connect(url) as (reader, writer):
        for start, end in pairwise(edges):
            writer.write(stream[start:end])
            await writer.drain()
        for position, item in enumerate(items):
            answer = await read_answer(reader)
            if item.kind == "refused":
                assert answer.status == item.status, (item, answer)
                assert answer.header("x-upstream") is None
                error_type(answer)
                assert await reader.read() == b""
                return accepted
            accepted.append(item)
            if answer.status == 101:
                assert item.kind == "ws"
                return accepted  # the caller checks the tunnel
            assert (answer.status, answer.header("x-upstream")) == (200, "h11"), (item, answer)
            assert answer.header("x-request-id") == item.request_id.decode()
            assert answer.body == item.body
            if item.terminal:
                assert await reader.read() == b"", items[position + 1 :]
                return accepted
    raise AssertionError("every stream ends with a terminal item")


async def check_stream(items: list[Item], cuts: list[int], accept_websocket: bool) -> None:
    upstream = StrictUpstream(accept_websocket=accept_websocket)
    with tempfile.TemporaryDirectory() as directory:
        async with (
            strict_upstream(upstream) as port,
            in_process_proxy(Path(directory), port) as (_, url),
            asyncio.timeout(SAFETY),
        ):
            accepted = await exchange(url, items, cuts)
            last = accepted[-1] if accepted else None
            if last is not None and last.kind == "ws" and accept_websocket:
                # every byte after the handshake went into the tunnel, untouched
                rest = b"".join(item.raw for item in items[len(accepted) :])
                await upstream.until(lambda: len(upstream.tunnel) >= len(rest))
                assert bytes(upstream.tunnel) == rest
            # what h11 parsed is exactly what the proxy accepted, in order, no more, no less
            assert upstream.violations == []
            seen = [(r.request_id, r.method, r.target, bytes(r.body)) for r in upstream.requests]
            sent = [(i.request_id, i.method, b"/ws" if i.kind == "ws" else b"/echo", i.body)
                    for i in accepted]  # fmt: skip
            assert seen == sent
            assert all(len(r.header(b"host")) == 1 for r in upstream.requests)
            # and the pool carries no leftovers into another client's request
            async with connect(url) as (reader, writer):
                victim = b"POST /sync/echo HTTP/1.1\r\nHost: v\r\nX-Request-ID: victim\r\n"
                writer.write(victim + b"Content-Length: 6\r\n\r\nvictim")
                answer = await read_answer(reader)
            assert (answer.status, answer.header("x-request-id"), answer.body) == (
                200,
                "victim",
                b"victim",
            )


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(streams(), st.lists(st.integers(0, 5000), max_size=6), st.booleans())
@example(
    [
        Item(REFUSED[0][0], "refused", status=405),
        Item(head(b"GET", [b"Host: a", b"X-Request-ID: r1"]), "close", b"r1"),
    ],
    [],
    False,
)
async def test_the_model_server_parses_exactly_the_requests_the_proxy_accepted(
    items: list[Item], cuts: list[int], accept_websocket: bool
) -> None:
    await check_stream(items, cuts, accept_websocket)


# -- the findings of issue 9, one by one ---------------------------------------------------


@pytest.mark.parametrize(
    "upgrade",
    [
        b"Connection: Upgrade\r\nUpgrade: websocket \r\n",
        b"Connection: Upgrade\r\nUpgrade: websocket\t\r\n",
        b"Connection: Upgrade\r\nUpgrade: WebSocket\r\n",
    ],
    ids=["trailing space", "trailing tab", "mixed case"],
)
async def test_a_websocket_handshake_never_lets_later_bytes_onto_a_pooled_connection(
    tmp_path: Path, upgrade: bytes
) -> None:
    """Issue 9's reproduction: the attacker's handshake, refused by the model server, then a
    request written straight behind it; the next client must get its own answer."""
    upstream = StrictUpstream()
    smuggled = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Request-ID: evil\r\nContent-Length: 4\r\n\r\nevil"
    )
    async with (
        strict_upstream(upstream) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
    ):
        async with connect(url) as (reader, writer):
            writer.write(b"GET /sync/health HTTP/1.1\r\nHost: x\r\n" + upgrade + b"\r\n" + smuggled)
            answer = await read_answer(reader)
            assert answer.status == 200  # the model server's answer to the handshake
            assert await reader.read() == b""  # then the connection ends: nothing more read
        async with connect(url) as (reader, writer):
            writer.write(b"POST /predict HTTP/1.1\r\nHost: v\r\nX-Request-ID: victim\r\n")
            writer.write(b"Content-Length: 6\r\n\r\nvictim")
            answer = await read_answer(reader)
        assert (answer.header("x-request-id"), answer.body) == ("victim", b"victim")
        assert [seen.target for seen in upstream.requests] == [b"/health", b"/predict"]
        assert upstream.requests[1].request_id == b"victim"
        assert upstream.violations == []


@pytest.mark.parametrize(
    "target", [b"/sync/x", b"http://proxy.test/sync/x", b"127.0.0.1:9"], ids=str
)
async def test_connect_is_405_in_every_form_and_nothing_after_it_is_read(
    tmp_path: Path, target: bytes
) -> None:
    upstream = StrictUpstream()
    async with (
        strict_upstream(upstream) as port,
        in_process_proxy(tmp_path, port) as (proxy, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        writer.write(b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLE)
        answer = await read_answer(reader)
        assert answer.status == 405
        assert error_type(answer) == "method_not_allowed"
        assert answer.header("allow")
        assert await reader.read() == b""
    assert upstream.requests == []
    assert proxy.metrics.requests == {}


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: 4\r\n\r\nabcd", b"Transfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"],
    ids=["length", "chunked"],
)
async def test_a_websocket_upgrade_with_a_body_is_400(tmp_path: Path, framing: bytes) -> None:
    upstream = StrictUpstream()
    async with (
        strict_upstream(upstream) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        asyncio.timeout(SAFETY),
        connect(url) as (reader, writer),
    ):
        handshake = b"GET /sync/ws HTTP/1.1\r\nHost: x\r\n" + b"\r\n".join(WEBSOCKET_WITH_BODY)
        writer.write(handshake + b"\r\n" + framing + SMUGGLE)
        answer = await read_answer(reader)
        assert answer.status == 400
        assert error_type(answer) == "bad_request"
        assert await reader.read() == b""
    assert upstream.requests == []
