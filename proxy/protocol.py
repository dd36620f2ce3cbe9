"""The client side of the proxy: one HTTP/1.1 connection parsed with llhttp, its requests
handed in order to exchanges that write the responses back.

aiohttp's server objects cost more per request than the whole forwarding budget, so the
listening side is a plain `asyncio.Protocol`; each read event ends with one flush, so a
request that arrives in one packet leaves for the model server in one write.

How each request's body is framed, and whether the connection may become a tunnel, is
decided once, in `framing.decide`, and only read here: see that module for the invariant.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, MutableSet
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from .errors import BadRequest, HeadersTooLarge, ProxyError, RequestTimeout, UriTooLong
from .framing import FRAMING_NAME_LENGTHS, FRAMING_NAMES, Headers, RequestHead, decide
from .framing import body_framing_head as _body_framing_head
from .local import LocalExchange, render_response

MAX_REQUEST_LINE = 8192
MAX_HEADER_LINE = 8192
MAX_HEADERS_TOTAL = 65536
MAX_HEADER_COUNT = 128
LINGER_TIMEOUT = 2.0  # after a last answer, how long what the client still sends is dropped
PIPELINE_DEPTH = 8  # queued requests on one connection before reading pauses

# write buffer limits of every socket: large enough that a fast stream is not paused and
# resumed every 64 KiB (uvloop's default), small enough to bound memory per connection
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLimits:
    """How long a client may take, in seconds; past a limit its connection is closed.

    The defaults are the contract's (proxy.client_*_timeout_seconds, keepalive_timeout_seconds),
    after nginx's; each bounds one way a client can hold a connection or a slot."""

    # a whole request head, from its first byte (or from the connect, for the first
    # request) to its end: a client trickling a head byte by byte (slowloris) is cut
    header_timeout: float = 30.0
    # the longest pause between two reads of a request body (not the whole body: an
    # upload may take long); time the proxy itself stops reading (backpressure) is not counted
    body_timeout: float = 60.0
    # the longest the client's socket may take none of our writes (nginx's send_timeout)
    send_timeout: float = 60.0
    # a kept-alive connection with no request in progress
    idle_timeout: float = 75.0


class Exchange(Protocol):
    """One request/response on a client connection; the connection drives it."""

    def start(self) -> None: ...  # its turn to answer (earlier pipelined ones are done)
    def request_body(self, chunk: bytes) -> None: ...
    def request_end(self) -> None: ...
    def request_failed(self, error: ProxyError) -> None: ...  # its body broke or stalled
    def flush(self) -> None: ...  # end of a read event: send what has gathered
    def client_lost(self) -> None: ...
    def pause_output(self) -> None: ...  # the client reads slower than we write
    def resume_output(self) -> None: ...


Router = Callable[[RequestHead, "ClientConnection"], Exchange]


class ClientConnection(asyncio.Protocol):
    """Parses requests off one client socket and serialises their exchanges."""

    def __init__(
        self,
        router: Router,
        connections: MutableSet[ClientConnection],
        limits: ConnectionLimits,
    ) -> None:
        self._router = router
        self._connections = connections
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self._exchanges: deque[Exchange] = deque()
        self._front_started = False  # whether _exchanges[0] has had its start()
        self._advancing = False
        self._url = b""
        self._headers: Headers = []
        self._framing_headers: Headers = []  # what framing.decide reads, lower-cased
        self._heads_begun = 0
        self._head_bytes = 0  # bytes read while the current head is incomplete
        self._header_bytes = 0  # the current head's complete header lines
        self._in_head = False
        self._in_body = False  # from the end of a head to the end of its body
        self._head: RequestHead | None = None  # the last head parsed
        self._last_read = 0.0  # loop time of the last read inside a body
        self._closing = False
        self._reading_paused = False
        self._writing_paused = False
        # nothing more is parsed: after a refusal, a broken body or a last answer, input is
        # dropped until the connection closes
        self._broken = False
        self._tunnel_pending = False  # after a WebSocket handshake: bytes wait for its 101
        self._skip_complete = False  # llhttp completes an ignored upgrade before its body
        self._body_only = False  # the parser reads a body whose head was already routed
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the loop's timer wakes
        self._deadline: float | None = None  # when the connection times out
        self._send_timer: asyncio.TimerHandle | None = None
        # a Content-Length body still to come: after the read its head arrived in, it
        # bypasses llhttp (which only copies it), and a fresh parser takes what follows
        self._body_left = 0
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
        self._stop_timers()
        exchanges, self._exchanges = self._exchanges, deque()
        for exchange in exchanges:
            exchange.client_lost()

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return None
        if self._tunnel_pending:
            # after a WebSocket handshake: the tunnel's, if the model server accepts it
            self._exchanges[-1].request_body(data)
            return None
        if self._body_left:
            data = self._pass_body(data)
        if data:
            self._parse(data)
        if self._in_body and not self._closing:
            # one clock read per read event; the timer is only armed once per body
            self._last_read = self.loop.time()
            if self._deadline is None:
                self._arm_timer(self._limits.body_timeout)
        if self._exchanges and self._front_started:
            self._exchanges[0].flush()
            if len(self._exchanges) > 1:
                self._exchanges[-1].flush()

    def _parse(self, data: bytes) -> None:
        while data:
            heads_begun, in_head = self._heads_begun, self._in_head
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                # parsed on in the loop, not in this handler: an error raised inside it
                # would lose the refusal it carries (its __context__)
                data = self._upgrade(data[upgrade.args[0] :])
                continue
            except httptools.HttpParserError as error:
                # a callback's own error (a refused head, too long a line) arrives wrapped
                cause = error.__context__
                refusal = cause if isinstance(cause, ProxyError) else None
                return self._fail(refusal or BadRequest(f"malformed HTTP request: {error}"))
            if self._in_head and in_head and heads_begun == self._heads_begun:
                # the whole read belongs to a head still incomplete (httptools holds it
                # until it is): counted per head, so a pipelined burst is not one big head
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEADERS_TOTAL:
                    self._fail(HeadersTooLarge())
            return

    def _upgrade(self, rest: bytes) -> bytes:
        """llhttp stopped after an upgrade head (its on_message_complete has run); what is
        left to parse as HTTP."""
        head = self._head
        assert head is not None
        if head.websocket:
            self._tunnel_pending = True
            if rest and self._exchanges:
                self._exchanges[-1].request_body(rest)  # sent before the 101 came
            return b""
        # an Upgrade the proxy ignores (RFC 9110 §7.8): the body, then HTTP/1.1 goes on
        self._parser = httptools.HttpRequestParser(self)
        framing = _body_framing_head(head)
        self._body_only = bool(framing)
        return framing + rest

    def eof_received(self) -> bool | None:
        # A client that closes its side has left, as nginx and Go's net/http take it (a
        # half-close cannot be told apart from a close): the transport closes, and the
        # request to the model server is cancelled at once.
        return None

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self._limits.send_timeout, self._send_stalled)
        if self._exchanges and self._front_started:
            self._exchanges[0].pause_output()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if not self._exchanges:
            return
        if self._front_started:
            self._exchanges[0].resume_output()
        else:
            self._advance()

    # -- llhttp callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._body_only:
            return
        self._in_head = True
        self._heads_begun += 1
        self._head_bytes = 0
        self._header_bytes = 0
        self._url = b""
        self._headers = []
        self._framing_headers = []
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
        if len(name) in FRAMING_NAME_LENGTHS:
            lower = name.lower()
            if lower in FRAMING_NAMES:
                self._framing_headers.append((lower, value))
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._body_only:
            return
        parser = self._parser
        parser_upgrade = parser.should_upgrade()
        head = decide(
            parser.get_method(),
            self._url,
            parser.get_http_version(),
            self._headers,
            self._framing_headers,
            keep_alive=parser.should_keep_alive(),
            parser_upgrade=parser_upgrade,
            client_ip=self.client_ip,
        )  # raises the refusal: answered in turn, and nothing after it is parsed
        self._head = head
        self._in_head = False
        self._in_body = True
        self._cancel_timer()
        if parser_upgrade:
            # llhttp skips the body of any upgrade head; an ignored upgrade's body is read
            # by a fresh parser (_upgrade), whose end completes the request
            self._skip_complete = head.has_body
        elif head.content_length:
            self._body_left = head.content_length
        exchange = self._router(head, self)
        self._exchanges.append(exchange)
        if len(self._exchanges) == 1:
            if not self._writing_paused:  # else resume_writing starts it
                self._front_started = True
                exchange.start()  # flushed at the end of the read event, with its body
        elif len(self._exchanges) >= PIPELINE_DEPTH:
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        if self._body_left:
            self._body_left -= len(body)
        if self._exchanges:
            self._exchanges[-1].request_body(body)

    def on_message_complete(self) -> None:
        if self._skip_complete:
            self._skip_complete = False
            return
        self._body_left = 0
        self._body_only = False
        if self._in_body:
            self._in_body = False
            self._cancel_timer()
        if self._exchanges:
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
        self._front_started = False
        if not request_done or not keep_alive:
            # answered before its body ended, or the last answer: what follows is not read
            return self._close_after_answer()
        if not self._advancing:
            self._advance()
        self.resume_reading()

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closing:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if (
            self._reading_paused
            and self.transport is not None
            and not self._closing
            and len(self._exchanges) < PIPELINE_DEPTH
        ):
            self._reading_paused = False
            self.transport.resume_reading()
            if self._in_body:  # the pause was the proxy's, not the client's
                self._last_read = self.loop.time()

    def detach(self) -> asyncio.Transport:
        """Hand the socket to a tunnel (WebSocket): this connection stops parsing."""
        assert self.transport is not None
        self._stop_timers()
        self._in_body = False
        self._connections.discard(self)
        self._exchanges.clear()
        self._closing = True
        return self.transport

    def close(self) -> None:
        """Close once what was written is sent (abort if the client takes nothing)."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if transport.get_write_buffer_size():
                transport.abort()  # a client that does not read would keep it open
            else:
                transport.close()
        self._closing = True

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._closing = True

    @property
    def idle(self) -> bool:
        return not self._exchanges and not self._in_head

    # -- internals --------------------------------------------------------------------

    def _advance(self) -> None:
        """Start the next exchanges in order, as long as each finishes at once (the proxy's
        own answers) and the client takes what is written (a pipelined burst of local
        answers respects back-pressure like forwarded ones)."""
        self._advancing = True
        try:
            while self._exchanges and not self._closing and not self._writing_paused:
                front = self._exchanges[0]
                if not self._front_started:
                    self._front_started = True
                    front.start()
                if self._exchanges and self._exchanges[0] is front:
                    front.flush()
                    break  # still answering
        finally:
            self._advancing = False
        if not self._exchanges and not self._closing and not self._in_head:
            self._arm_timer(self._limits.idle_timeout)

    def _fail(self, error: ProxyError) -> None:
        """Nothing more can be parsed: the request whose head or body broke is answered
        with `error` in its turn (after the ones before it), then the connection closes."""
        self._broken = True
        self._body_left = 0
        self._stop_timer()
        exchanges = self._exchanges
        if self._in_body and exchanges:
            exchanges[-1].request_failed(error)  # its body broke or stalled
            return
        head = RequestHead(b"", b"", "1.1", [], keep_alive=False, client_ip=self.client_ip)
        refusal = LocalExchange.error(self, head, error, close=True)
        refusal.request_end()  # nothing more of it is read
        exchanges.append(refusal)
        if len(exchanges) == 1:
            self._advance()

    def _close_after_answer(self) -> None:
        """Half-close, drop what the client still sends for a moment, then close (nginx's
        lingering close): closing at once while its bytes arrive would reset the
        connection, and a reset can destroy the answer before the client reads it."""
        self._broken = True
        for exchange in self._exchanges:  # pipelined behind a last answer: never served
            exchange.client_lost()
        self._exchanges.clear()
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            return self.close()
        transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._arm_timer(LINGER_TIMEOUT)

    def _pass_body(self, data: bytes) -> bytes:
        """The rest of a Content-Length body, passed on without llhttp, which would only
        copy it; returns what follows the body (a pipelined request)."""
        left = self._body_left
        if len(data) <= left:  # the usual case: the read is all body, passed as it is
            body, rest = data, b""  # (a compiled slice copies even a whole bytes)
        else:
            body, rest = data[:left], data[left:]
        self.on_body(body)
        if not self._body_left:
            self._parser = httptools.HttpRequestParser(self)  # the old one stopped mid-body
            self.on_message_complete()
        return rest

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
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stop_timers(self) -> None:
        """For good: the connection is gone or handed over."""
        self._stop_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

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
        if self._broken:
            self.close()  # the lingering after a last answer is over
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
        self._fail(RequestTimeout("timed out reading the request body"))

    def _send_stalled(self) -> None:
        """The client took none of our writes for send_timeout: it is cut, and the model
        server's request with it (connection_lost reports the loss to the exchanges)."""
        self._send_timer = None
        if self._writing_paused:
            self.abort()
