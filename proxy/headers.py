"""Header hygiene for both directions: hop-by-hop headers dropped, X-Forwarded-* and
X-Request-ID set, and the body framing of each message read once."""

from __future__ import annotations

import random

Headers = list[tuple[bytes, bytes]]

# what the proxy does with a request header, by lower-cased name (absent: pass it on)
_REQUEST_ROLES = {
    # RFC 9110 §7.6.1 hop-by-hop headers, and Expect, which the proxy answers itself
    **dict.fromkeys((b"connection", b"keep-alive", b"te", b"trailer"), "hop"),
    b"expect": "expect",  # not passed on: the proxy answers 100-continue itself
    b"upgrade": "upgrade",  # hop-by-hop too, but a WebSocket handshake keeps it
    b"transfer-encoding": "chunked",
    b"content-length": "length",
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


class RequestFraming:
    """How the request body arrives: a known length, chunked, or none; and whether the
    client waits for a 100 Continue before sending it."""

    __slots__ = ("chunked", "content_length", "expects_continue", "request_id")

    def __init__(
        self,
        content_length: int | None,
        chunked: bool,
        request_id: bytes,
        expects_continue: bool,
    ) -> None:
        self.content_length = content_length
        self.chunked = chunked
        self.request_id = request_id
        self.expects_continue = expects_continue


def upstream_request_head(
    method: bytes,
    target: bytes,
    headers: Headers,
    *,
    client_ip: str,
    websocket: bool = False,
) -> tuple[bytes, RequestFraming]:
    """The request head to send to the model server, and what the proxy learned of the
    body on the way. The body is always re-framed by the proxy."""
    lowered = [name.lower() for name, _ in headers]
    named = _connection_tokens(headers, lowered)
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    request_id = forwarded_for = b""
    host: bytes | None = None
    content_length: int | None = None
    chunked = has_proto = has_forwarded_host = expects_continue = False
    for (name, value), lower in zip(headers, lowered, strict=True):
        role = _REQUEST_ROLES.get(lower)
        # framing first: the proxy must know it whatever a Connection header names
        if role == "chunked":
            chunked = value.strip().lower().endswith(b"chunked")
            continue
        if role == "length":
            content_length = int(value)  # llhttp has checked it is a number, and only one
            continue
        if role == "expect":
            expects_continue = value.strip().lower() == b"100-continue"
            continue
        if websocket and lower in _WEBSOCKET_KEPT:
            parts += (name, b": ", value, b"\r\n")
            continue
        if role in ("hop", "upgrade") or lower in named or lower.startswith(b"proxy-"):
            continue  # `Connection: X-Request-ID` drops that one too
        if role == "request-id":
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
    ip = client_ip.encode()
    parts += (b"X-Forwarded-For: ", forwarded_for + b", " + ip if forwarded_for else ip, b"\r\n")
    if not has_proto:
        parts.append(b"X-Forwarded-Proto: http\r\n")
    if host is not None and not has_forwarded_host:
        parts += (b"X-Forwarded-Host: ", host, b"\r\n")
    parts += (b"X-Request-ID: ", request_id, b"\r\n")
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % content_length)
    parts.append(b"\r\n")
    framing = RequestFraming(
        None if chunked else content_length, chunked, request_id, expects_continue
    )
    return b"".join(parts), framing


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
