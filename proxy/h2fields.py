"""What a proxy must check of HTTP/2 requests and trailers before it passes them on (RFC
9113 §8.1-8.3): a strict peer behind it may take a malformed one for an error of the whole
connection, which the calls of other clients share. Field syntax is the HPACK decoder's."""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]

_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})


def malformed(headers: Headers) -> str | None:
    """Why a request's headers break RFC 9113 §8.2-8.3 (the ones a proxy must catch before
    passing them on: a strict server may take them for an error of the whole connection the
    calls of other clients share), or None: pseudo-headers first, known, once each, :method,
    :scheme and a non-empty :path present, no CONNECT; no connection-specific field; `te`
    only "trailers"; one `host`, the same as :authority; a `content-length` of digits.
    The field syntax (names lower-case...) is the HPACK decoder's to check."""
    seen: set[bytes] = set()
    regular = False
    authority = host = length = None
    for name, value in headers:
        if name[:1] == b":":
            if regular or name not in _PSEUDO or name in seen:
                return f"pseudo-header {name!r} out of place"
            seen.add(name)
            if name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return "an empty :path"
            elif name == b":method" and value == b"CONNECT":
                return "CONNECT"  # a tunnel: nothing the proxy forwards
        else:
            regular = True
            if name in _CONNECTION_SPECIFIC:
                return f"header {name!r} not allowed in HTTP/2"
            if name == b"te" and value != b"trailers":
                return "te other than trailers"
            if name == b"host":
                if host is not None:
                    return "more than one host"
                host = value
            elif name == b"content-length":
                if not value.isdigit() or len(value) > 18 or (length and value != length):
                    return "a bad content-length"
                length = value
    if len(seen & {b":method", b":scheme", b":path"}) != 3:
        return "a request needs :method, :scheme and :path"
    if host is not None and authority is not None and host != authority:
        return "host and :authority differ"
    return None


def malformed_trailers(headers: Headers) -> bool:
    """Trailers carry no pseudo-header nor connection-specific field (RFC 9113 §8.1)."""
    return any(
        name[:1] == b":" or name in _CONNECTION_SPECIFIC or name == b"te" for name, _ in headers
    )
