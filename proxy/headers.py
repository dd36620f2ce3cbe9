"""Header hygiene for both directions: hop-by-hop headers dropped, X-Forwarded-* and
X-Request-ID set, and the body framing of each message read once."""

from __future__ import annotations

import os

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1, plus the framing headers the proxy writes itself
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
# re-written by the proxy on the way in
_REPLACED_IN = frozenset({b"content-length", b"expect", b"x-request-id"})
_WEBSOCKET_KEPT = frozenset({b"connection", b"upgrade"})


def new_request_id() -> bytes:
    return os.urandom(16).hex().encode()


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return frozenset(tokens)


def _dropped(lower: bytes, named: frozenset[bytes]) -> bool:
    return lower in _HOP_BY_HOP or lower in named or lower.startswith(b"proxy-")


class RequestFraming:
    """How the request body arrives: a known length, chunked, or none."""

    __slots__ = ("chunked", "content_length", "request_id")

    def __init__(self, content_length: int | None, chunked: bool, request_id: bytes) -> None:
        self.content_length = content_length
        self.chunked = chunked
        self.request_id = request_id


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
    named = _connection_tokens(headers)
    lines = [method + b" " + target + b" HTTP/1.1"]
    request_id = b""
    forwarded_for = b""
    content_length: int | None = None
    chunked = False
    has_host = has_proto = has_fwd_host = False
    host = b""
    for name, value in headers:
        lower = name.lower()
        if lower == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif lower == b"content-length":
            content_length = int(value)  # llhttp has checked it is a number, and only one
        elif websocket and lower in _WEBSOCKET_KEPT:
            lines.append(name + b": " + value)
        elif _dropped(lower, named):
            pass  # before the headers the proxy reads: `Connection: X-Request-ID` drops it too
        elif lower == b"x-request-id":
            request_id = value
        elif lower == b"x-forwarded-for":
            if value:  # an empty one adds no hop (nor an empty list element)
                forwarded_for = forwarded_for + b", " + value if forwarded_for else value
        elif lower in _REPLACED_IN:
            pass
        else:
            if lower == b"host":
                has_host, host = True, value
            elif lower == b"x-forwarded-proto":
                has_proto = True
            elif lower == b"x-forwarded-host":
                has_fwd_host = True
            lines.append(name + b": " + value)
    if not request_id:
        request_id = new_request_id()
    ip = client_ip.encode()
    lines.append(b"X-Forwarded-For: " + (forwarded_for + b", " + ip if forwarded_for else ip))
    if not has_proto:
        lines.append(b"X-Forwarded-Proto: http")
    if has_host and not has_fwd_host:
        lines.append(b"X-Forwarded-Host: " + host)
    lines.append(b"X-Request-ID: " + request_id)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
    elif content_length is not None:
        lines.append(b"Content-Length: %d" % content_length)
    framing = RequestFraming(None if chunked else content_length, chunked, request_id)
    return b"\r\n".join(lines) + b"\r\n\r\n", framing


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
    named = _connection_tokens(headers)
    lines: list[bytes] = []
    content_length: int | None = None
    chunked = False
    has_request_id = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            content_length = int(value)
        elif lower == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif _dropped(lower, named):
            pass
        else:
            has_request_id = has_request_id or lower == b"x-request-id"
            lines.append(name + b": " + value)
    if not has_request_id:
        lines.append(b"X-Request-ID: " + request_id)
    return ResponseFraming(lines, None if chunked else content_length, chunked)


def websocket_response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """A 101 answer passed back as the model server gave it, minus non-upgrade hop-by-hop
    headers (Sec-WebSocket-Accept/Protocol/Extensions pass untouched)."""
    named = _connection_tokens(headers) - _WEBSOCKET_KEPT
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    for name, value in headers:
        lower = name.lower()
        if lower in _WEBSOCKET_KEPT or not _dropped(lower, named):
            lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"
