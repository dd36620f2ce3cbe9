"""Header hygiene for both directions: hop-by-hop headers dropped, X-Forwarded-* and
X-Request-ID set; a request's body framing is written as framing.decide made it."""

from __future__ import annotations

import random

from .framing import Headers, RequestHead

# what the proxy does with a request header, by lower-cased name (absent: pass it on)
_REQUEST_ROLES = {
    # RFC 9110 §7.6.1 hop-by-hop headers, and Expect, which the proxy answers itself
    **dict.fromkeys((b"connection", b"keep-alive", b"te", b"trailer"), "hop"),
    # the body's framing and Expect: framing.decide read them; the proxy writes its own
    **dict.fromkeys((b"transfer-encoding", b"content-length", b"expect"), "framing"),
    b"upgrade": "upgrade",  # hop-by-hop too, but a WebSocket handshake keeps it
    b"x-request-id": "request-id",
    b"x-forwarded-for": "forwarded-for",
    b"host": "host",
    b"x-forwarded-proto": "forwarded-proto",
    b"x-forwarded-host": "forwarded-host",
}
_RESPONSE_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
_WEBSOCKET_KEPT = frozenset({b"connection", b"upgrade"})
_NEVER_NAMED = frozenset({b"host"})  # `Connection: close, Host` cannot remove it
MAX_REQUEST_ID = 200
_PRINTABLE = bytes(range(0x20, 0x7F))


def new_request_id() -> bytes:
    # unique, not secret: Python's generator (seeded from urandom) spares a syscall a request
    return b"%032x" % random.getrandbits(128)


def _connection_tokens(headers: Headers, lowered: list[bytes]) -> frozenset[bytes]:
    """The header names a Connection header lists (hop-by-hop by that listing)."""
    if b"connection" not in lowered:
        return frozenset()
    tokens: set[bytes] = set()
    for (_, value), lower in zip(headers, lowered, strict=True):
        if lower == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return frozenset(tokens)


def valid_request_id(value: bytes) -> bool:
    """A client's X-Request-ID is kept when it is printable ASCII of at most 200 bytes."""
    return 0 < len(value) <= MAX_REQUEST_ID and not value.translate(None, _PRINTABLE)


def client_request_id(head: RequestHead) -> bytes:
    """The request's id: the client's own when it is valid, else a new one."""
    for name, value in head.headers:
        if name.lower() == b"x-request-id" and valid_request_id(value):
            return value
    return new_request_id()


def upstream_request_head(
    head: RequestHead, target: bytes, *, authority: bytes
) -> tuple[bytes, bytes]:
    """The request head to send to the model server, and the request's X-Request-ID. The
    body's framing is the one framing.decide made; the proxy always re-frames the body.
    `authority` is the model server's host:port, its Host when the client sent none."""
    headers = head.headers
    websocket = head.websocket
    lowered = [name.lower() for name, _ in headers]
    # Connection may name hop-by-hop headers, never the ones the request cannot go without
    named = _connection_tokens(headers, lowered) - _NEVER_NAMED
    parts = [head.method, b" ", target, b" HTTP/1.1\r\n"]
    request_id = forwarded_for = b""
    host: bytes | None = None
    has_proto = has_forwarded_host = False
    for (name, value), lower in zip(headers, lowered, strict=True):
        role = _REQUEST_ROLES.get(lower)
        if role == "framing":
            continue  # decided once, written below
        if websocket and lower in _WEBSOCKET_KEPT:
            parts += (name, b": ", value, b"\r\n")
            continue
        if role in ("hop", "upgrade") or lower in named or lower.startswith(b"proxy-"):
            continue  # `Connection: X-Request-ID` drops that one too
        if role == "request-id":
            if not request_id and valid_request_id(value):
                request_id = value
            continue
        if role == "forwarded-for":
            if value:  # an empty one adds no hop (nor an empty list element)
                forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            continue
        if role == "host":
            host = value
        elif role == "forwarded-proto":
            has_proto = True
        elif role == "forwarded-host":
            has_forwarded_host = True
        parts += (name, b": ", value, b"\r\n")
    if not request_id:
        request_id = new_request_id()
    ip = head.client_ip.encode()
    parts += (b"X-Forwarded-For: ", forwarded_for + b", " + ip if forwarded_for else ip, b"\r\n")
    if not has_proto:
        parts.append(b"X-Forwarded-Proto: http\r\n")
    if host is None:  # an HTTP/1.0 client's: HTTP/1.1 to the model server needs one
        parts += (b"Host: ", authority, b"\r\n")
    elif not has_forwarded_host:
        parts += (b"X-Forwarded-Host: ", host, b"\r\n")
    parts += (b"X-Request-ID: ", request_id, b"\r\n")
    if head.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif head.content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % head.content_length)
    parts.append(b"\r\n")
    return b"".join(parts), request_id


class ResponseFraming:
    """What the model server's response head says of its body."""

    __slots__ = ("chunked", "content_length", "lines")

    def __init__(self, lines: list[bytes], content_length: int | None, chunked: bool) -> None:
        self.lines = lines
        self.content_length = content_length
        self.chunked = chunked


def scan_response_headers(headers: Headers, request_id: bytes) -> ResponseFraming:
    """The end-to-end header lines to pass to the client (with X-Request-ID added when the
    model server did not echo one), and the response's body framing."""
    lowered = [name.lower() for name, _ in headers]
    named = _connection_tokens(headers, lowered)
    lines: list[bytes] = []
    content_length: int | None = None
    chunked = False
    for (name, value), lower in zip(headers, lowered, strict=True):
        if lower == b"content-length":
            content_length = int(value)
        elif lower == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif not (lower in _RESPONSE_HOP_BY_HOP or lower in named or lower.startswith(b"proxy-")):
            lines.append(name + b": " + value)
    if b"x-request-id" not in lowered or b"x-request-id" in named:
        lines.append(b"X-Request-ID: " + request_id)
    return ResponseFraming(lines, None if chunked else content_length, chunked)


def websocket_response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """A 101 answer passed back as the model server gave it, minus non-upgrade hop-by-hop
    headers (Sec-WebSocket-Accept/Protocol/Extensions pass untouched)."""
    lowered = [name.lower() for name, _ in headers]
    named = _connection_tokens(headers, lowered) - _WEBSOCKET_KEPT
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    for (name, value), lower in zip(headers, lowered, strict=True):
        if lower in _WEBSOCKET_KEPT or not (
            lower in _RESPONSE_HOP_BY_HOP or lower in named or lower.startswith(b"proxy-")
        ):
            lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"
