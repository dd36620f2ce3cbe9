"""Header hygiene: `upstream_request_head` and `scan_response_headers` by example and by
property, and end to end through the proxy in both directions."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.errors import BadRequest
from proxy.framing import FRAMING_NAMES, RequestHead, decide
from proxy.headers import scan_response_headers, upstream_request_head

from .conftest import fake_upstream, in_process_proxy
from .test_forward import (
    Recorder,
    connect,
    raw_upstream,
    read_request_head,
    read_response,
    request,
    send,
)

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
# what the proxy itself writes on the way in (the rest is the client's, untouched)
PROXY_SET_IN = {
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
    b"content-length",
    b"transfer-encoding",
}


def parse_head(head: bytes) -> tuple[bytes, Headers]:
    assert head.endswith(b"\r\n\r\n")
    first, *lines = head[:-4].split(b"\r\n")
    headers = []
    for line in lines:
        name, sep, value = line.partition(b": ")
        assert sep, line
        headers.append((name, value))
    return first, headers


def parse_lines(lines: list[bytes]) -> Headers:
    return [(name, value) for name, _, value in (line.partition(b": ") for line in lines)]


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name]


def connection_named(headers: Headers) -> set[bytes]:
    return {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }


def decided(
    method: bytes, target: bytes, headers: Headers, *, client_ip: str = "127.0.0.1"
) -> RequestHead:
    """The head as the parser hands it over, with framing.decide's decision on it (HTTP/1.0
    when there is no Host, which HTTP/1.1 requires)."""
    framing = [(name.lower(), value) for name, value in headers if name.lower() in FRAMING_NAMES]
    has_host = any(name == b"host" for name, _ in framing)
    upgrade = any(name == b"upgrade" for name, _ in framing)
    return decide(
        method,
        target,
        "1.1" if has_host else "1.0",
        headers,
        framing,
        keep_alive=True,
        parser_upgrade=upgrade,
        client_ip=client_ip,
    )


def forward(headers: Headers, *, method: bytes = b"POST") -> tuple[bytes, Headers, bytes]:
    """The request line and headers sent to the model server, and the request id."""
    head = decided(method, b"/v1/x?a=1", headers, client_ip="10.0.0.9")
    sent_head, request_id = upstream_request_head(head, b"/v1/x?a=1", authority=b"127.0.0.1:8000")
    first, sent = parse_head(sent_head)
    return first, sent, request_id


# -- the request head ---------------------------------------------------------------------


def test_request_line_and_end_to_end_headers_in_order() -> None:
    headers = [
        (b"Host", b"api.example.com"),
        (b"Accept", b"text/event-stream"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (b"Cookie", b"a=1"),
        (b"X-Custom", b"one"),
        (b"X-Custom", b"two"),
        (b"Authorization", b"Bearer secret"),
        (b"Content-Type", b"application/json"),
    ]
    first, sent, _ = forward(headers)
    assert first == b"POST /v1/x?a=1 HTTP/1.1"
    assert [(k, v) for k, v in sent if k.lower() not in PROXY_SET_IN] == headers


def test_hop_by_hop_request_headers_are_dropped() -> None:
    headers = [
        (b"Host", b"h"),
        (b"Connection", b"keep-alive, X-Hop-One"),
        (b"connection", b" x-hop-two ,Upgrade"),
        (b"X-Hop-One", b"1"),
        (b"X-HOP-TWO", b"2"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"X-Checksum"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authorization", b"Basic eDp5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"proxy-anything", b"x"),
        (b"Expect", b"100-continue"),
        (b"X-Kept", b"yes"),
    ]
    _, sent, _ = forward(headers)
    names = [name.lower() for name, _ in sent]
    assert not set(names) & (HOP_BY_HOP | {b"x-hop-one", b"x-hop-two", b"expect"})
    assert not [name for name in names if name.startswith(b"proxy-")]
    assert (b"X-Kept", b"yes") in sent


def test_headers_the_proxy_reads_can_be_named_by_connection_too() -> None:
    headers = [
        (b"Connection", b"X-Request-ID, X-Forwarded-For"),
        (b"X-Request-ID", b"from-a-hop"),
        (b"X-Forwarded-For", b"203.0.113.1"),
    ]
    _, sent, request_id = forward(headers)
    assert values(sent, b"x-forwarded-for") == [b"10.0.0.9"]
    assert values(sent, b"x-request-id") != [b"from-a-hop"]
    assert request_id != b"from-a-hop"


def test_connection_cannot_remove_host_or_the_framing() -> None:
    headers = [
        (b"Host", b"api.example.com"),
        (b"Connection", b"close, Host, Content-Length"),
        (b"Content-Length", b"3"),
    ]
    _, sent, _ = forward(headers)
    assert values(sent, b"host") == [b"api.example.com"]
    assert values(sent, b"content-length") == [b"3"]


def test_websocket_upgrades_keep_connection_and_upgrade() -> None:
    headers = [
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Keep-Alive", b"300"),
    ]
    _, sent, _ = forward(headers, method=b"GET")
    assert (b"Connection", b"Upgrade") in sent
    assert (b"Upgrade", b"websocket") in sent
    assert (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ==") in sent
    assert values(sent, b"keep-alive") == []


@pytest.mark.parametrize(
    ("incoming", "expected"),
    [
        ([], b"10.0.0.9"),
        ([b"203.0.113.7"], b"203.0.113.7, 10.0.0.9"),
        ([b"203.0.113.7, 198.51.100.2"], b"203.0.113.7, 198.51.100.2, 10.0.0.9"),
        ([b"203.0.113.7", b"198.51.100.2"], b"203.0.113.7, 198.51.100.2, 10.0.0.9"),
    ],
)
def test_x_forwarded_for_is_appended(incoming: list[bytes], expected: bytes) -> None:
    _, sent, _ = forward([(b"X-Forwarded-For", value) for value in incoming])
    assert values(sent, b"x-forwarded-for") == [expected]


def test_x_forwarded_proto_and_host_are_set_or_kept() -> None:
    _, sent, _ = forward([(b"Host", b"api.example.com")])
    assert values(sent, b"x-forwarded-proto") == [b"http"]
    assert values(sent, b"x-forwarded-host") == [b"api.example.com"]
    _, sent, _ = forward(
        [
            (b"Host", b"internal:8080"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"public.example.com"),
        ]
    )
    assert values(sent, b"x-forwarded-proto") == [b"https"]
    assert values(sent, b"x-forwarded-host") == [b"public.example.com"]


def test_x_request_id_is_kept_or_generated() -> None:
    _, sent, request_id = forward([(b"X-Request-ID", b"client-chosen-1")])
    assert values(sent, b"x-request-id") == [b"client-chosen-1"]
    assert request_id == b"client-chosen-1"
    generated = set()
    for headers in ([], [(b"X-Request-ID", b"")]):
        _, sent, request_id = forward(headers)
        (value,) = values(sent, b"x-request-id")
        assert re.fullmatch(rb"[0-9a-f]{32}", value)
        assert request_id == value
        generated.add(value)
    assert len(generated) == 2


@pytest.mark.parametrize(
    "bad",
    [b"a" * 201, b"tab\there", b"\x7fdel", "caf\u00e9".encode(), b"nul\x00"],
)
def test_an_x_request_id_that_is_not_short_printable_ascii_is_replaced(bad: bytes) -> None:
    _, sent, request_id = forward([(b"X-Request-ID", bad)])
    assert values(sent, b"x-request-id") == [request_id]
    assert re.fullmatch(rb"[0-9a-f]{32}", request_id)
    _, _, kept = forward([(b"X-Request-ID", b"~" * 200)])
    assert kept == b"~" * 200


@pytest.mark.parametrize(
    ("headers", "length", "chunked", "framing_line"),
    [
        ([], None, False, None),
        ([(b"Content-Length", b"42")], 42, False, b"Content-Length: 42"),
        ([(b"Content-Length", b"0")], 0, False, b"Content-Length: 0"),
        ([(b"Transfer-Encoding", b"chunked")], None, True, b"Transfer-Encoding: chunked"),
        ([(b"transfer-encoding", b" Chunked\t")], None, True, b"Transfer-Encoding: chunked"),
    ],
)
def test_request_framing(
    headers: Headers, length: int | None, chunked: bool, framing_line: bytes | None
) -> None:
    decision = decided(b"PUT", b"/", headers)
    assert decision.content_length == length
    assert decision.chunked is chunked
    head, _ = upstream_request_head(decision, b"/", authority=b"127.0.0.1:8000")
    _, sent = parse_head(head)
    lines = [name + b": " + value for name, value in sent]
    framing_lines = [
        line for line in lines if line.lower().startswith((b"content-length", b"transfer-encoding"))
    ]
    assert framing_lines == ([framing_line] if framing_line else [])


# -- the response head --------------------------------------------------------------------


def test_response_hop_by_hop_headers_are_dropped_and_cookies_kept() -> None:
    headers = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"keep-alive, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Trailer", b"X-Checksum"),
        (b"Upgrade", b"h2c"),
        (b"TE", b"trailers"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"Set-Cookie", b"b=2; Path=/"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ]
    scanned = scan_response_headers(headers, b"rid")
    assert parse_lines(scanned.lines) == [
        (b"Content-Type", b"text/plain"),
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"Set-Cookie", b"b=2; Path=/"),
        (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        (b"X-Request-ID", b"rid"),
    ]
    assert scanned.chunked is True
    assert scanned.content_length is None


@pytest.mark.parametrize(
    ("headers", "length", "chunked"),
    [
        ([], None, False),
        ([(b"Content-Length", b"10")], 10, False),
        ([(b"Transfer-Encoding", b"chunked")], None, True),
        ([(b"Transfer-Encoding", b"gzip, chunked")], None, True),
    ],
)
def test_response_framing(headers: Headers, length: int | None, chunked: bool) -> None:
    scanned = scan_response_headers(headers, b"rid")
    assert (scanned.content_length, scanned.chunked) == (length, chunked)
    assert not [line for line in scanned.lines if line.lower().startswith(b"content-length")]


def test_a_model_servers_own_request_id_is_kept() -> None:
    scanned = scan_response_headers([(b"x-request-id", b"upstream-id")], b"rid")
    assert parse_lines(scanned.lines) == [(b"x-request-id", b"upstream-id")]


# -- properties ---------------------------------------------------------------------------


def random_case(name: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([name, name.upper(), name.title(), name.swapcase()])


TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(
    lambda text: ("x-" + text).encode()
)
HOP_NAMES = st.sampled_from(
    [b"connection", b"keep-alive", b"te", b"trailer", b"upgrade", b"proxy-authorization",
     b"proxy-connection", b"proxy-x"]
)  # fmt: skip
END_TO_END_NAMES = st.sampled_from(
    [b"accept", b"cookie", b"set-cookie", b"traceparent", b"host", b"authorization",
     b"content-type", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-for",
     b"x-request-id", b"user-agent"]
)  # fmt: skip
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
VALUE = st.text(alphabet=PRINTABLE, max_size=12).map(lambda text: text.strip().encode())


@st.composite
def header_lists(draw: st.DrawFn) -> Headers:
    headers: Headers = []
    for _ in range(draw(st.integers(0, 12))):
        name = draw(st.one_of(HOP_NAMES, END_TO_END_NAMES, TOKEN).flatmap(random_case))
        if name.lower() == b"connection":
            tokens = draw(st.lists(st.one_of(TOKEN, END_TO_END_NAMES, HOP_NAMES), max_size=3))
            value = b", ".join(tokens) or draw(VALUE)
        else:
            value = draw(VALUE)
        headers.append((name, value))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "length":
        headers.insert(
            draw(st.integers(0, len(headers))),
            (b"Content-Length", b"%d" % draw(st.integers(0, 10**9))),
        )
    elif framing == "chunked":
        headers.insert(draw(st.integers(0, len(headers))), (b"Transfer-Encoding", b"chunked"))
    return headers


def dropped(name: bytes, named: set[bytes]) -> bool:
    lower = name.lower()
    return lower in HOP_BY_HOP or lower in named or lower.startswith(b"proxy-")


@settings(max_examples=200)
@given(header_lists())
@example([(b"Connection", b"x-request-id"), (b"X-Request-ID", b"from-a-hop")])
@example([(b"X-Forwarded-For", b"203.0.113.1"), (b"X-Forwarded-For", b"")])
@example([(b"connection", b"host, Content-Length"), (b"Host", b"h"), (b"Content-Length", b"3")])
def test_request_head_properties(headers: Headers) -> None:
    try:
        decision = decided(b"GET", b"/x", headers)
    except BadRequest:
        # refused, never forwarded: only a head whose Host or upgrade is ambiguous
        hosts = [k for k, _ in headers if k.lower() == b"host"]
        assert len(hosts) > 1 or any(k.lower() == b"upgrade" for k, _ in headers)
        return
    head, request_id = upstream_request_head(decision, b"/x", authority=b"127.0.0.1:8000")
    _, sent = parse_head(head)
    named = connection_named(headers) - {b"host"}  # Connection cannot remove Host
    # no hop-by-hop header survives (what the proxy writes itself is checked below)
    for name, _ in sent:
        assert name.lower() in PROXY_SET_IN or not dropped(name, named), name
    # end-to-end headers all survive, in order, untouched (a Host is added when none came)
    kept = [(k, v) for k, v in headers if not dropped(k, named)]
    if not values(headers, b"host"):
        kept.append((b"Host", b"127.0.0.1:8000"))
    assert [(k, v) for k, v in sent if k.lower() not in PROXY_SET_IN] == [
        (k, v) for k, v in kept if k.lower() not in PROXY_SET_IN
    ]

    def client(name: bytes) -> list[bytes]:
        return [v for k, v in kept if k.lower() == name]

    forwarded_for = b", ".join([*filter(None, client(b"x-forwarded-for")), b"127.0.0.1"])
    assert values(sent, b"x-forwarded-for") == [forwarded_for]
    assert values(sent, b"x-forwarded-proto") == (client(b"x-forwarded-proto") or [b"http"])
    hosts = values(headers, b"host")  # never dropped, whatever Connection names
    assert values(sent, b"host") == (hosts or [b"127.0.0.1:8000"])
    assert values(sent, b"x-forwarded-host") == (client(b"x-forwarded-host") or hosts)
    request_ids = [v for v in client(b"x-request-id") if v]  # the first valid one counts
    assert values(sent, b"x-request-id") == [request_id]
    if request_ids:
        assert request_id == request_ids[0]
    else:
        assert re.fullmatch(rb"[0-9a-f]{32}", request_id)
    # framing: read from the client's headers whatever Connection says, written once
    chunked = any(k.lower() == b"transfer-encoding" for k, _ in headers)
    lengths = [int(v) for k, v in headers if k.lower() == b"content-length"]
    assert decision.chunked is chunked
    assert decision.content_length == (None if chunked or not lengths else lengths[-1])
    assert values(sent, b"content-length") == (
        [] if decision.content_length is None else [b"%d" % decision.content_length]
    )
    assert values(sent, b"transfer-encoding") == ([b"chunked"] if chunked else [])


@settings(max_examples=200)
@given(header_lists(), st.booleans())
@example([(b"Connection", b"x-request-id"), (b"X-Request-ID", b"upstream")], False)
def test_response_head_properties(headers: Headers, echo_id: bool) -> None:
    if echo_id:
        headers = [*headers, (b"X-Request-ID", b"upstream-id")]
    scanned = scan_response_headers(headers, b"proxy-id")
    lines = parse_lines(scanned.lines)
    named = connection_named(headers)
    framing = {b"content-length", b"transfer-encoding"}
    kept = [(k, v) for k, v in headers if not dropped(k, named) and k.lower() not in framing]
    has_id = any(k.lower() == b"x-request-id" for k, _ in kept)
    assert lines == (kept if has_id else [*kept, (b"X-Request-ID", b"proxy-id")])
    for name, value in lines:
        assert not dropped(name, named) or (name, value) == (b"X-Request-ID", b"proxy-id")
        assert name.lower() not in framing
    chunked = any(k.lower() == b"transfer-encoding" for k, _ in headers)
    lengths = [int(v) for k, v in headers if k.lower() == b"content-length"]
    assert scanned.chunked is chunked
    assert scanned.content_length == (None if chunked or not lengths else lengths[-1])


# -- end to end ---------------------------------------------------------------------------

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_request_headers_through_the_proxy(tmp_path: Path) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        end_to_end = [
            ("Accept", "text/event-stream"),
            ("traceparent", TRACEPARENT),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("Cookie", "a=1; b=2"),
            ("X-Custom", "one"),
            ("X-Custom", "two"),
        ]
        hop = [
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic eDp5"),
            ("Proxy-Connection", "keep-alive"),
        ]
        headers = [("Host", "api.example.com"), *hop[:3], *end_to_end, *hop[3:]]
        response = await send(url, request("GET", "/sync/h", headers))
        assert response.status == 200
        seen = [(k, v) for k, v in response.json()["headers"]]
        names = {k.lower() for k, _ in seen}
        assert not names & {k.lower() for k, _ in hop}
        assert [(k, v) for k, v in seen if (k, v) in end_to_end] == end_to_end
        assert ("Host", "api.example.com") in seen
        assert ("X-Forwarded-For", "127.0.0.1") in seen
        assert ("X-Forwarded-Proto", "http") in seen
        assert ("X-Forwarded-Host", "api.example.com") in seen


async def test_forwarded_headers_through_the_proxy(tmp_path: Path) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        headers = [
            ("X-Forwarded-For", "203.0.113.7"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "public.example.com"),
        ]
        response = await send(url, request("GET", "/sync/h", headers))
        seen = response.json()["headers"]
        assert [v for k, v in seen if k == "X-Forwarded-For"] == ["203.0.113.7, 127.0.0.1"]
        assert [v for k, v in seen if k.lower() == "x-forwarded-proto"] == ["https"]
        assert [v for k, v in seen if k.lower() == "x-forwarded-host"] == ["public.example.com"]


async def test_x_request_id_reaches_both_ends(tmp_path: Path) -> None:
    upstream = Recorder()
    async with fake_upstream(upstream.app) as port, in_process_proxy(tmp_path, port) as (_, url):
        kept = await send(url, request("GET", "/sync/a", [("X-Request-ID", "req-42")]))
        assert kept.header("x-request-id") == "req-42"
        assert [v for k, v in kept.json()["headers"] if k == "X-Request-ID"] == ["req-42"]
        made = await send(url, request("GET", "/sync/b"))
        generated = made.header("x-request-id")
        assert generated is not None
        assert re.fullmatch("[0-9a-f]{32}", generated)
        assert [v for k, v in made.json()["headers"] if k == "X-Request-ID"] == [generated]
        assert made.all("x-request-id") == [generated]


async def test_response_headers_through_the_proxy(tmp_path: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(
            b"HTTP/1.1 201 Created\r\n"
            b"Content-Type: text/plain\r\n"
            b"Connection: keep-alive, X-Resp-Hop\r\n"
            b"X-Resp-Hop: 1\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Upgrade: h2c\r\n"
            b"Trailer: X-Checksum\r\n"
            b"Proxy-Authenticate: Basic\r\n"
            b"Set-Cookie: a=1; Path=/\r\n"
            b"Set-Cookie: b=2; Path=/\r\n"
            b"traceparent: " + TRACEPARENT.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 1\r\n\r\n"
        )
        await writer.drain()
        await read_request_head(reader)

    async with raw_upstream(handle) as (port, _), in_process_proxy(tmp_path, port) as (_, url):
        response = await send(url, request("GET", "/sync/r"))
        assert response.status == 201
        assert response.body == b"hello world"
        names = [name.lower() for name, _ in response.headers]
        for hop in ("x-resp-hop", "keep-alive", "upgrade", "trailer", "proxy-authenticate"):
            assert hop not in names
        assert response.all("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
        assert response.header("traceparent") == TRACEPARENT
        assert response.all("transfer-encoding") == ["chunked"]
        assert response.all("connection") == []


async def test_repeated_response_headers_keep_every_value(tmp_path: Path) -> None:
    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.headers.add("Set-Cookie", "session=abc; HttpOnly")
        response.headers.add("Set-Cookie", "theme=dark")
        response.headers.add("Link", "</a>; rel=preload")
        response.headers.add("Link", "</b>; rel=preload")
        return response

    app = web.Application()
    app.router.add_get("/cookies", cookies)
    async with fake_upstream(app) as port, in_process_proxy(tmp_path, port) as (_, url):
        response = await send(url, request("GET", "/sync/cookies"))
        assert response.all("set-cookie") == ["session=abc; HttpOnly", "theme=dark"]
        assert response.all("link") == ["</a>; rel=preload", "</b>; rel=preload"]


SERVER_TIMING_QUEUE = re.compile(r"queue;dur=(\d+\.\d{3}), upstream;dur=\d+\.\d{3}")


async def test_server_timing_queue_is_the_wait_for_a_slot(tmp_path: Path) -> None:
    """`queue;dur` is the time a request waited for its slot: not the time its body took to
    arrive (a buffered body holds no slot), but the wait behind a request holding the one
    slot."""
    entered = asyncio.Event()

    async def slow(http: web.Request) -> web.Response:
        entered.set()
        await asyncio.sleep(0.3)  # ok: the model server's work (a request waits behind it)
        return web.Response(text="slow")

    async def echo(http: web.Request) -> web.Response:
        return web.Response(body=await http.read())

    app = web.Application()
    app.router.add_post("/slow", slow)
    app.router.add_post("/echo", echo)
    async with (
        fake_upstream(app) as port,
        in_process_proxy(tmp_path, port, predict_concurrency=1) as (_, url),
        connect(url) as (reader, writer),
    ):
        # half a body now, the rest once a slow request came and went: ~0.3 s to arrive
        writer.write(request("POST", "/sync/echo", [("Content-Length", "4")]) + b"ab")
        await send(url, request("POST", "/sync/slow", body=b"x"))
        writer.write(b"cd")
        buffered = await read_response(reader)
        # a request sent while the slow one holds the slot waits for it
        entered.clear()
        holder = asyncio.ensure_future(send(url, request("POST", "/sync/slow", body=b"x")))
        await entered.wait()
        queued = await send(url, request("POST", "/sync/echo", body=b"q"))
        await holder
    assert (buffered.status, buffered.body, queued.body) == (200, b"abcd", b"q")
    waits = [
        SERVER_TIMING_QUEUE.fullmatch(r.header("server-timing") or "") for r in (buffered, queued)
    ]
    assert all(waits)
    buffered_ms, queued_ms = (float(wait[1]) for wait in waits if wait)
    assert buffered_ms < 100  # its body took ~300 ms to come, but no slot was waited for
    assert queued_ms > 100  # it waited (up to ~300 ms) for the slow request's slot
