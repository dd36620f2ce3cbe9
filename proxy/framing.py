"""The one decision about a request's framing: how its body is delimited, whether its
connection may become a tunnel, or why it is refused. Made once, from the parsed head;
the parser, the router and the forwarder only read it.

The invariant it exists for: no byte a client sends after a request head reaches the model
server except as that request's body, re-framed by the proxy, or inside a WebSocket tunnel
the model server accepted with 101. Two places that each work out how a body is framed can
disagree, and that disagreement is request smuggling: add no second one.
"""

from __future__ import annotations

from .errors import BadRequest, MethodNotAllowed

Headers = list[tuple[bytes, bytes]]

# the headers the decision reads, by lower-cased name; the parser hands over only these
FRAMING_NAMES = frozenset(
    {b"host", b"expect", b"upgrade", b"connection", b"content-length", b"transfer-encoding"}
)
FRAMING_NAME_LENGTHS = frozenset(map(len, FRAMING_NAMES))
VERSIONS = frozenset({"1.0", "1.1"})
# what a proxied route takes: anything but CONNECT (RFC 9110 §9.1 wants the list on a 405)
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class ConnectNotAllowed(MethodNotAllowed):
    default_message = "CONNECT is not supported: the proxy is not a tunnel"
    headers = ((b"Allow", ALLOWED_METHODS),)


class RequestHead:
    """A request head and the framing decision made on it.

    `content_length` and `chunked` say how the body is delimited (neither: no body);
    `websocket` is the only way the connection can leave HTTP: a WebSocket handshake that
    becomes a tunnel if, and only if, the model server answers 101."""

    __slots__ = (
        "chunked",
        "client_ip",
        "content_length",
        "expects_continue",
        "headers",
        "keep_alive",
        "method",
        "target",
        "version",
        "websocket",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: str,
        headers: Headers,
        *,
        keep_alive: bool,
        client_ip: str,
        content_length: int | None = None,
        chunked: bool = False,
        websocket: bool = False,
        expects_continue: bool = False,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.client_ip = client_ip
        self.content_length = content_length
        self.chunked = chunked
        self.websocket = websocket
        self.expects_continue = expects_continue

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, lower_name: bytes) -> bytes | None:
        for name, value in self.headers:
            if name.lower() == lower_name:
                return value
        return None


def decide(
    method: bytes,
    target: bytes,
    version: str,
    headers: Headers,
    framing_headers: Headers,
    *,
    keep_alive: bool,
    parser_upgrade: bool,
    client_ip: str,
) -> RequestHead:
    """The request head with its framing decided, or the ProxyError that refuses it.

    `framing_headers` are the (lower-cased name, value) pairs of FRAMING_NAMES, in order;
    `parser_upgrade` is llhttp's own opinion (Connection: upgrade with an Upgrade header, or
    CONNECT), which must agree with ours wherever the connection would become a tunnel."""
    if method == b"CONNECT":
        raise ConnectNotAllowed()
    if version not in VERSIONS:
        # HTTP/0.9 has no headers: "GET /x\nY: z HTTP/1.1" would reach the model server as a
        # header smuggled through the request line
        raise BadRequest(f"HTTP/{version} is not supported: use HTTP/1.1")
    hosts = 0
    codings: list[bytes] = []
    lengths: list[bytes] = []
    upgrade: list[bytes] = []
    connection: set[bytes] = set()
    expects_continue = False
    for name, value in framing_headers:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings += _tokens(value)
        elif name == b"upgrade":
            upgrade += _tokens(value)
        elif name == b"connection":
            connection.update(_tokens(value))
        else:  # expect
            expects_continue = value.strip().lower() == b"100-continue"
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        raise BadRequest("an HTTP/1.1 request needs exactly one Host header")
    content_length = _content_length(lengths)
    chunked = bool(codings)
    if chunked:
        if codings != [b"chunked"]:
            raise BadRequest("Transfer-Encoding must be exactly chunked")
        if content_length is not None:
            raise BadRequest("Content-Length and Transfer-Encoding together are ambiguous")
    websocket = method == b"GET" and upgrade == [b"websocket"] and b"upgrade" in connection
    if websocket:
        if chunked or content_length:
            raise BadRequest("a WebSocket upgrade request must not carry a body")
        if not parser_upgrade:
            raise BadRequest("ambiguous upgrade request")
    return RequestHead(
        method,
        target,
        version,
        headers,
        keep_alive=keep_alive,
        client_ip=client_ip,
        content_length=content_length,
        chunked=chunked,
        websocket=websocket,
        expects_continue=expects_continue
        and version == "1.1"
        and (chunked or bool(content_length)),
    )


def body_framing_head(head: RequestHead) -> bytes:
    """A bare request head with `head`'s body framing, for a fresh parser to read that body
    with (after an Upgrade the proxy ignores, llhttp stops at the head); b"" for no body."""
    if head.chunked:
        return b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    if head.content_length:
        return b"PUT / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % head.content_length
    return b""


def _tokens(value: bytes) -> list[bytes]:
    """A comma-separated header value as lower-cased tokens, empty elements dropped."""
    return [token for token in (part.strip(b" \t").lower() for part in value.split(b",")) if token]


def _content_length(values: list[bytes]) -> int | None:
    if not values:
        return None
    if len(values) > 1 or not values[0].strip(b" \t").isdigit():
        raise BadRequest("invalid Content-Length")  # llhttp refuses these first
    return int(values[0])
