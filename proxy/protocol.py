"""The client side of the proxy: one HTTP/1.1 connection parsed with llhttp, its requests
handed in order to exchanges that write the responses back.

aiohttp's server objects cost more per request than the whole forwarding budget, so the
listening side is a plain `asyncio.Protocol`; each read event ends with one flush, so a
request that arrives in one packet leaves for the model server in one write.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol, cast

import httptools

from .errors import BadRequest, HeadersTooLarge, ProxyError, RequestTimeout, UriTooLong

MAX_REQUEST_LINE = 8192
MAX_HEADER_LINE = 8192
MAX_HEADERS_TOTAL = 65536
MAX_HEADER_COUNT = 128
LINGER_TIMEOUT = 2.0  # after an early response, how long an unread body is discarded
PIPELINE_DEPTH = 8  # queued requests on one connection before reading pauses

# write buffer limits of every socket: large enough that a fast stream is not paused and
# resumed every 64 KiB (uvloop's default), small enough to bound memory per connection
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024

_VERSIONS = frozenset({"1.0", "1.1"})
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimits:
    """How long a client may take, in seconds; past a limit its connection is closed.

    The defaults follow nginx (client_header_timeout and client_body_timeout 60 s,
    keepalive_timeout 75 s), the head's a little stricter: a head is a few hundred bytes.
    """

    # a whole request head, from its first byte (or from the connect, for the first
    # request) to its end: a client trickling a head byte by byte (slowloris) is cut
    header_timeout: float = 30.0
    # the longest pause between two reads of a request body (not the whole body: an
    # upload may take long); time the proxy itself stops reading (backpressure) is not counted
    body_timeout: float = 60.0
    # a kept-alive connection with no request in progress
    idle_timeout: float = 75.0


class RequestHead:
    """What the parser knows of a request once its headers are complete."""

    __slots__ = ("client_ip", "headers", "keep_alive", "method", "target", "upgrade", "version")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: str,
        headers: Headers,
        keep_alive: bool,
        upgrade: bool,
        client_ip: str,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.client_ip = client_ip

    def header(self, lower_name: bytes) -> bytes | None:
        for name, value in self.headers:
            if name.lower() == lower_name:
                return value
        return None


class Exchange(Protocol):
    """One request/response on a client connection; the connection drives it."""

    def start(self) -> None: ...  # its turn to answer (earlier pipelined ones are done)
    def request_body(self, chunk: bytes) -> None: ...
    def request_end(self) -> None: ...
    def flush(self) -> None: ...  # end of a read event: send what has gathered
    def client_lost(self) -> None: ...
    def request_timed_out(self) -> None: ...  # its body stopped arriving
    def pause_output(self) -> None: ...  # the client reads slower than we write
    def resume_output(self) -> None: ...


Router = Callable[[RequestHead, "ClientConnection"], Exchange]


def render_response(
    status: int, headers: Headers, body: bytes, *, close: bool, head_only: bool = False
) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Unknown"))]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Content-Length: %d" % len(body))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else body)


def error_headers(error: ProxyError) -> Headers:
    headers: Headers = [(b"Content-Type", b"application/json"), *error.headers]
    if error.retry_after is not None:
        headers.append((b"Retry-After", b"%d" % error.retry_after))
    return headers


class ClientConnection(asyncio.Protocol):
    """Parses requests off one client socket and serialises their exchanges."""

    def __init__(
        self, router: Router, connections: set[ClientConnection], limits: ConnectionLimits
    ) -> None:
        self._router = router
        self._connections = connections
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self._exchanges: deque[Exchange] = deque()
        self._url = b""
        self._headers: Headers = []
        self._transfer_encoding: bytes | None = None  # the current head's last one
        self._head_bytes = 0  # bytes read while the current head is incomplete
        self._header_bytes = 0  # the current head's complete header lines
        self._in_head = False
        self._in_body = False  # from the end of a head to the end of its body
        self._last_read = 0.0  # loop time of the last read inside a body
        self._closing = False
        self._reading_paused = False
        self._lingering = False
        self._dropping = False  # answered an error: what still arrives is dropped unread
        self._upgraded = False
        # an Upgrade the proxy does not take (h2c...): the synthetic head that lets a fresh
        # parser read the body llhttp skipped (b"": no body), then HTTP/1.1 goes on
        self._upgrade_declined: bytes | None = None
        self._body_only = False  # the parser reads a body whose head was already routed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the loop's timer wakes
        # a Content-Length body still to come: after the read its head arrived in, it
        # bypasses llhttp (which only copies it), and a fresh parser takes what follows
        self._body_left = 0
        self._content_length: bytes | None = None
        self._deadline: float | None = None  # when the connection times out
        # kept: each asyncio.get_running_loop() costs a getpid() system call
        self.loop = asyncio.get_running_loop()

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self._connections.add(self)
        self._arm_timer(self._limits.header_timeout)  # the first request's head, as nginx

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._closing = True
        self._stop_timer()
        exchanges, self._exchanges = self._exchanges, deque()
        for exchange in exchanges:
            exchange.client_lost()

    def data_received(self, data: bytes) -> None:
        if self._dropping:
            return None
        if self._lingering:
            return self._discard(data)
        if self._upgraded:
            # bytes after an upgrade request belong to the tunnel being set up
            if self._exchanges:
                self._exchanges[-1].request_body(data)
                self._exchanges[-1].flush()
            return None
        if self._body_left:
            data = self._pass_body(data)
        if data and self._feed(data) and self._in_head:
            # the read ends inside a head, which httptools holds until it is complete
            # (counted after parsing: a head that began in this read counts too)
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADERS_TOTAL:
                self._fail(HeadersTooLarge())
        if self._in_body and not self._closing:
            # one clock read per read event; the timer is only armed once per body
            self._last_read = self.loop.time()
            if self._deadline is None:
                self._arm_timer(self._limits.body_timeout)
        if self._exchanges:
            self._exchanges[0].flush()
            if len(self._exchanges) > 1:
                self._exchanges[-1].flush()

    def _feed(self, data: bytes) -> bool:
        """Parse `data`; False when the request was malformed (and answered)."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            rest = data[upgrade.args[0] :]
            if self._upgrade_declined is None:
                self._upgraded = True
                if rest and self._exchanges:
                    # bytes sent before the 101 answer; the tunnel forwards them first
                    self._exchanges[-1].request_body(rest)
                return True
            # llhttp stopped after the head as if the protocol changed; it did not
            head, self._upgrade_declined = self._upgrade_declined, None
            self._parser = httptools.HttpRequestParser(self)
            if head:
                self._body_only = True
            else:
                self.on_message_complete()
            return self._feed(head + rest) if head or rest else True
        except httptools.HttpParserError as error:
            # a callback's own error (too long a line) arrives wrapped by httptools
            cause = error.__context__
            if isinstance(cause, ProxyError):
                self._fail(cause)
            else:
                self._fail(BadRequest(f"malformed HTTP request: {error}"))
            return False
        return True

    def eof_received(self) -> bool | None:
        # A client that closes its side has left, as nginx and Go's net/http take it (a
        # half-close cannot be told apart from a close): the transport closes, and the
        # request to the model server is cancelled at once, counted 499.
        return None

    def pause_writing(self) -> None:
        if self._exchanges:
            self._exchanges[0].pause_output()

    def resume_writing(self) -> None:
        if self._exchanges:
            self._exchanges[0].resume_output()

    # -- llhttp callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._body_only:
            return
        self._in_head = True
        self._head_bytes = 0
        self._header_bytes = 0
        self._url = b""
        self._headers = []
        self._transfer_encoding = None
        self._content_length = None
        self._arm_timer(self._limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        if self._body_only:
            return
        self._url += url
        if len(self._url) > MAX_REQUEST_LINE:
            raise UriTooLong()

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._body_only:
            return
        size = len(name) + len(value)
        self._header_bytes += size
        if (
            size > MAX_HEADER_LINE
            or self._header_bytes > MAX_HEADERS_TOTAL
            or len(self._headers) >= MAX_HEADER_COUNT
        ):
            raise HeadersTooLarge()
        if len(name) == 17 and name.lower() == b"transfer-encoding":
            self._transfer_encoding = value
        elif len(name) == 14 and name.lower() == b"content-length":
            self._content_length = value
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._body_only:
            return
        if self._transfer_encoding is not None and not _chunked(self._transfer_encoding):
            # llhttp refuses it too, but only after this callback, once the request has
            # been routed: refused here, it is answered 400 and nothing is forwarded
            raise BadRequest("a request's Transfer-Encoding must end with chunked")
        parser = self._parser
        version = parser.get_http_version()
        if version not in _VERSIONS:
            # HTTP/0.9 has no headers: "GET /x\nY: z HTTP/1.1" would reach the model
            # server as a header smuggled through the request line
            raise BadRequest(f"HTTP/{version} is not supported: use HTTP/1.1")
        self._in_head = False
        self._in_body = True
        self._cancel_timer()
        head = RequestHead(
            parser.get_method(),
            self._url,
            version,
            self._headers,
            parser.should_keep_alive(),
            parser.should_upgrade(),
            self.client_ip,
        )
        if head.upgrade and not _tunnels(head):
            # RFC 9110 §7.8: an Upgrade may be ignored. llhttp would hand every byte after
            # this head (its body, the next requests) to a tunnel; keep parsing them as HTTP
            self._upgrade_declined = _body_framing(head)
        if self._content_length is not None and not head.upgrade:
            self._body_left = int(self._content_length)  # llhttp checked it is one number
        exchange = self._router(head, self)
        self._exchanges.append(exchange)
        if len(self._exchanges) == 1:
            exchange.start()
        elif len(self._exchanges) >= PIPELINE_DEPTH:
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self._body_left:
            self._body_left -= len(body)
        if self._exchanges and not self._lingering:
            self._exchanges[-1].request_body(body)

    def on_message_complete(self) -> None:
        if self._upgrade_declined is not None:
            return  # the body, if any, is read after the upgrade pause
        self._body_left = 0
        self._body_only = False
        if self._in_body:
            self._in_body = False
            if not self._lingering:
                self._cancel_timer()
        if self._lingering:
            self.close()
        elif self._exchanges:
            self._exchanges[-1].request_end()

    # -- used by exchanges ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(data)

    def writelines(self, pieces: list[bytes]) -> None:
        if self.transport is not None and not self._closing:
            self.transport.writelines(pieces)

    def respond(self, status: int, headers: Headers, body: bytes, *, close: bool) -> None:
        self.write(render_response(status, headers, body, close=close))

    def response_done(self, exchange: Exchange, *, keep_alive: bool, request_done: bool) -> None:
        """The exchange wrote its whole response; go on with the next request or close."""
        if not self._exchanges or self._exchanges[0] is not exchange:
            return
        self._exchanges.popleft()
        if not request_done:
            self._linger()
            return
        if not keep_alive or self._upgraded:
            self.close()
            return
        if self._exchanges:
            self._exchanges[0].start()
            self._exchanges[0].flush()
        else:
            self._arm_timer(self._limits.idle_timeout)
        self.resume_reading()

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._closing:
            self._reading_paused = False
            self.transport.resume_reading()
            if self._in_body:  # the pause was the proxy's, not the client's
                self._last_read = self.loop.time()

    def detach(self) -> asyncio.Transport:
        """Hand the socket to a tunnel (WebSocket): this connection stops parsing."""
        assert self.transport is not None
        self._stop_timer()
        self._in_body = False
        self._connections.discard(self)
        self._exchanges.clear()
        self._closing = True
        return self.transport

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self._closing = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._closing = True

    @property
    def idle(self) -> bool:
        return not self._exchanges and not self._in_head

    # -- internals --------------------------------------------------------------------

    def _fail(self, error: ProxyError) -> None:
        """The request cannot be parsed: answer it (if nothing was answered yet) and close."""
        if self._exchanges:
            for exchange in self._exchanges:
                exchange.client_lost()
            self._exchanges.clear()
            self.abort()
            return
        self.respond(error.status, error_headers(error), error.body(), close=True)
        self._close_after_answer()

    def _close_after_answer(self) -> None:
        """Half-close, drop what the client still sends for a moment, then close (nginx's
        lingering close): closing at once while its bytes arrive would reset the
        connection, and a reset can destroy the answer before the client reads it."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        self._dropping = True
        self.resume_reading()
        self._arm_timer(LINGER_TIMEOUT)

    def _linger(self) -> None:
        """Answered before the body ended: drop the rest of it briefly so the client
        reads our answer instead of a reset, then close."""
        self._lingering = True
        self.resume_reading()
        self._arm_timer(LINGER_TIMEOUT)

    def _pass_body(self, data: bytes) -> bytes:
        """The rest of a Content-Length body, passed on without llhttp, which would only
        copy it; returns what follows the body (a pipelined request)."""
        body, rest = data[: self._body_left], data[self._body_left :]
        self.on_body(body)
        if not self._body_left:
            self._parser = httptools.HttpRequestParser(self)  # the old one stopped mid-body
            self.on_message_complete()
        return rest

    def _discard(self, data: bytes) -> None:
        if self._body_left:  # a body that bypasses the parser: only its length matters
            self._body_left -= min(len(data), self._body_left)
            if not self._body_left:
                self.close()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, ProxyError):
            self.close()

    def _arm_timer(self, seconds: float) -> None:
        """Time the connection out `seconds` from now. The deadline moves with every
        request, so the loop's timer is only replaced when the new deadline comes before
        it; otherwise it wakes, finds the deadline moved, and sleeps again (two timers a
        request cost more than the rest of the connection's bookkeeping)."""
        if self.transport is None:
            return
        deadline = self.loop.time() + seconds
        self._deadline = deadline
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _cancel_timer(self) -> None:
        self._deadline = None  # the loop's timer, if any, wakes to nothing

    def _stop_timer(self) -> None:
        """For good: the connection is gone or handed over."""
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None:
            return
        if deadline > self.loop.time():
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        self._deadline = None
        self._timed_out()

    def _timed_out(self) -> None:
        if self._lingering or self._dropping:
            self.close()
        elif self._in_head:
            self._fail(RequestTimeout("timed out reading the request head"))
        elif self._in_body and not self._closing:
            self._body_timer_fired()
        else:
            self.close()  # idle

    def _body_timer_fired(self) -> None:
        now = self.loop.time()
        if self._reading_paused:
            self._last_read = now  # the proxy holds the body back: not the client's pause
        waited = now - self._last_read
        if waited < self._limits.body_timeout:
            self._arm_timer(self._limits.body_timeout - waited)  # a read came since
            return
        # the body stopped arriving: the request it belongs to (the last one) answers 408
        # if it can and cancels its upstream request; requests before it are cut
        exchanges, self._exchanges = self._exchanges, deque()
        if exchanges:
            stalled = exchanges.pop()
            for exchange in exchanges:
                exchange.client_lost()
            stalled.request_timed_out()
        self.close()


def _tunnels(head: RequestHead) -> bool:
    """Whether an upgrade request turns the connection into a tunnel (a WebSocket;
    CONNECT, which is refused, and the connection closed)."""
    upgrade = head.header(b"upgrade") or b""
    return head.method == b"CONNECT" or upgrade.strip().lower() == b"websocket"


def _chunked(transfer_encoding: bytes) -> bool:
    """Whether the last coding is chunked, as llhttp reads it (RFC 9112 §6.3: a request
    body whose last coding is not chunked has no reliable length)."""
    return transfer_encoding.rpartition(b",")[2].strip(b" \t").lower() == b"chunked"


def _body_framing(head: RequestHead) -> bytes:
    """A head with only the body framing of `head`, for a parser to read that body."""
    encoding = head.header(b"transfer-encoding")
    if encoding is not None:
        return b"PUT / HTTP/1.1\r\nTransfer-Encoding: " + encoding + b"\r\n\r\n"
    length = head.header(b"content-length")
    if length is not None and length.strip() not in (b"", b"0"):
        return b"PUT / HTTP/1.1\r\nContent-Length: " + length + b"\r\n\r\n"
    return b""


class LocalExchange:
    """A response the proxy writes itself (its own endpoints and its errors)."""

    __slots__ = ("_conn", "_keep_alive", "_request_done", "_response", "_started")

    def __init__(
        self, conn: ClientConnection, head: RequestHead, status: int, headers: Headers, body: bytes
    ) -> None:
        self._conn = conn
        close = not head.keep_alive or head.upgrade
        self._keep_alive = not close
        self._response = render_response(
            status, headers, body, close=close, head_only=head.method == b"HEAD"
        )
        self._started = False
        self._request_done = False

    @classmethod
    def error(
        cls,
        conn: ClientConnection,
        head: RequestHead,
        error: ProxyError,
        *,
        close: bool = False,
        request_id: bytes | None = None,
    ) -> LocalExchange:
        if close:
            head.keep_alive = False
        headers = error_headers(error)
        if request_id is not None:
            headers.append((b"X-Request-ID", request_id))
        return cls(conn, head, error.status, headers, error.body())

    def start(self) -> None:
        self._started = True
        self._conn.write(self._response)
        if self._request_done:
            self._done()

    def request_body(self, chunk: bytes) -> None:
        pass  # nobody reads it

    def request_end(self) -> None:
        self._request_done = True
        if self._started:
            self._done()

    def flush(self) -> None:
        pass

    def client_lost(self) -> None:
        pass

    def request_timed_out(self) -> None:
        pass  # its answer is written already, or never will be: the connection closes

    def pause_output(self) -> None:
        pass

    def resume_output(self) -> None:
        pass

    def _done(self) -> None:
        self._conn.response_done(self, keep_alive=self._keep_alive, request_done=True)
