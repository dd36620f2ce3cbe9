"""HTTP forwarding to the model server: the exchange that streams one request there, on a
connection from the pool (upstream.py), and its response back, chunk by chunk, both ways.

Everything a read event produces for the other side goes out in one `writelines`, and
body chunks are passed on as they are (only re-framed), never copied into a whole body.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import Protocol

from .errors import (
    PayloadTooLarge,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .framing import Headers, RequestHead
from .headers import scan_response_headers, upstream_request_head, websocket_response_head
from .local import REASONS, error_headers
from .metrics import disconnect_phase
from .protocol import ClientConnection
from .upstream import UpstreamConnection, UpstreamPool

HIGH_WATER = 256 * 1024  # request bytes held while waiting for a slot or a connection
# a client that left, by how far its request had come (model_proxy_client_disconnects_total)
REPLAY_LIMIT = 64 * 1024  # a request this small is resent once if a reused connection was stale
CHUNK_END = b"\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class Admission(Protocol):
    """The concurrency limiter, as the exchange sees it."""

    def try_acquire(self) -> bool: ...
    async def acquire(self) -> None: ...  # raises QueueFull / QueueTimeout
    def release(self) -> None: ...


class Outcome(Protocol):
    """Where a finished exchange reports itself (metrics, access log)."""

    def __call__(self, exchange: ProxyExchange) -> None: ...


class Scanner(Protocol):
    """Reads a response's body chunks as they pass (proxy/events.py)."""

    def feed(self, chunk: bytes) -> None: ...


class ScanResponse(Protocol):
    """A scanner for the response whose head the model server sent, or None."""

    def __call__(self, exchange: ProxyExchange, headers: Headers) -> Scanner | None: ...


class OnUpgrade(Protocol):
    """Takes over both sockets once the model server answered 101."""

    def __call__(
        self,
        exchange: ProxyExchange,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        from_client: bytes,
        from_upstream: bytes,
    ) -> None: ...


class ProxyExchange:
    """One proxied request: admitted, sent to the model server, its answer streamed back."""

    __slots__ = (
        "_admission",
        "_admitted",
        "_body_bytes",
        "_buffer_limit",
        "_buffering",
        "_chunked_in",
        "_chunked_out",
        "_continue",
        "_deferred",
        "_done",
        "_early",
        "_max_body",
        "_on_upgrade",
        "_outcome",
        "_pending",
        "_pending_bytes",
        "_pool",
        "_replay",
        "_request_timeout",
        "_response_out",
        "_scan",
        "_started",
        "_task",
        "_timer",
        "_until_close",
        "_upstream_head",
        "_websocket",
        "admitted_at",
        "arrived_at",
        "code",
        "conn",
        "disconnect",
        "error_kind",
        "first_byte_at",
        "head",
        "queued_at",
        "request_done",
        "request_id",
        "route",
        "scanner",
        "sent_at",
        "target",
        "upstream",
    )

    def __init__(
        self,
        conn: ClientConnection,
        head: RequestHead,
        *,
        route: str,
        target: bytes,
        pool: UpstreamPool,
        admission: Admission,
        outcome: Outcome,
        max_body: int,
        buffer_body: int,
        request_timeout: float | None,
        on_upgrade: OnUpgrade | None = None,
        scan: ScanResponse | None = None,
    ) -> None:
        self.conn = conn
        self.head = head
        self.route = route
        self.target = target
        self._pool = pool
        self._admission = admission
        self._outcome = outcome
        self._max_body = max_body
        self._request_timeout = request_timeout
        self._websocket = head.websocket
        self._on_upgrade = on_upgrade
        self.arrived_at = monotonic()  # not loop.time(): uvloop's has millisecond steps
        self.queued_at: float | None = None  # when it asked for a slot
        self.admitted_at: float | None = None
        self.first_byte_at: float | None = None
        self.sent_at: float | None = None  # the request went to the model server
        self._scan = scan
        self.scanner: Scanner | None = None
        self.code = 0
        self.error_kind: str | None = None
        self.disconnect: str | None = None  # the phase in which the client left, if it did
        self.request_done = False
        self.upstream: UpstreamConnection | None = None
        # framed now: body chunks of a pipelined request arrive before its turn
        self._upstream_head, self.request_id = upstream_request_head(
            head, target, authority=pool.authority
        )
        self._chunked_in = head.chunked
        # Expect is not passed on (the body is re-framed), so the proxy invites the body
        # itself when the request's turn comes, as nginx does
        self._continue = head.expects_continue
        self._deferred: ProxyError | None = None  # failed before its turn: answered in turn
        if head.content_length is not None and head.content_length > max_body:
            self._deferred = PayloadTooLarge()
        # a body up to buffer_body is read whole before the request asks for a slot: a
        # client sending slowly then holds no slot (nginx buffers request bodies too)
        self._buffer_limit = buffer_body
        self._buffering = buffer_body > 0 and (
            head.chunked or 0 < (head.content_length or 0) <= buffer_body
        )
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._body_bytes = 0
        self._early: list[bytes] = []  # client bytes after a WebSocket upgrade, until the 101
        self._chunked_out = False
        self._until_close = False  # the response body ends when the model server closes
        self._started = False
        self._admitted = False
        self._done = False
        self._replay: list[bytes] | None = None
        self._response_out: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- driven by the client connection ----------------------------------------------

    def start(self) -> None:
        self._started = True
        if self._deferred is not None:
            return self.fail(self._deferred)
        if self._continue and not self.request_done:
            self.conn.write(CONTINUE)
        self._pending.insert(0, self._upstream_head)
        if not self._buffering:
            self._ask_for_slot()

    def _ask_for_slot(self) -> None:
        self.queued_at = monotonic()
        if self._admission.try_acquire():
            self._on_admitted()
        else:
            self._task = asyncio.ensure_future(self._wait_for_slot())

    def _stop_buffering(self) -> None:
        """The body is whole, or larger than the proxy holds: the request asks for a slot
        (now if its turn has come, else when it does)."""
        self._buffering = False
        if self._started and not self._done:
            self._ask_for_slot()

    def request_body(self, chunk: bytes) -> None:
        if self._done or self._deferred is not None:
            return
        if self._websocket and self.request_done:
            # after the upgrade request: never sent as HTTP, only into an accepted tunnel
            self._early.append(chunk)
            if sum(map(len, self._early)) > HIGH_WATER:
                self.conn.pause_reading()  # the tunnel resumes it
            return
        self._body_bytes += len(chunk)
        if self._body_bytes > self._max_body:
            return self.fail(PayloadTooLarge())
        if self._chunked_in:
            self._queue(b"%x\r\n" % len(chunk), chunk, CHUNK_END)
        else:
            self._queue(chunk)
        if self._buffering and self._body_bytes > self._buffer_limit:
            self._stop_buffering()

    def request_end(self) -> None:
        self.request_done = True
        if self._done or self._deferred is not None:
            return
        if self._chunked_in:
            self._queue(LAST_CHUNK)
        if self._buffering:
            self._stop_buffering()

    def flush(self) -> None:
        upstream = self.upstream
        if upstream is not None and self._pending:
            pending = self._pending
            if self._replay is not None:
                # kept only while small: the body bytes seen so far bound what was sent
                if self._body_bytes > REPLAY_LIMIT:
                    self._replay = None
                else:
                    self._replay += pending
            upstream.write(pending)
            self._pending = []
            self._pending_bytes = 0

    def client_lost(self) -> None:
        """The client left: the model server's request is cancelled. As nginx logs it, 499
        if no response head was sent, else the status that was."""
        if self._done:
            return
        answered = self.first_byte_at is not None
        self.disconnect = disconnect_phase(admitted=self._admitted, answered=answered)
        self._finish(self.code if answered else 499, lost=True)

    def request_failed(self, error: ProxyError) -> None:
        """The body broke (bad chunk) or stopped arriving: `error` is the answer if nothing
        was answered yet, and the request to the model server is cancelled (its connection
        is dropped, never reused with a partial body); the client connection closes after."""
        self.fail(error)

    def pause_output(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_output(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # -- driven by the upstream connection --------------------------------------------

    def response_head(self, status: int, reason: bytes, headers: Headers) -> int | None:
        """Queue the client's response head; the length of a body to pass on as it is."""
        self._cancel_timer()
        self._replay = None
        self.code = status
        self.first_byte_at = monotonic()
        scanned = scan_response_headers(headers, self.request_id)
        lines = [b"HTTP/1.1 %d %s" % (status, reason or REASONS.get(status, b""))]
        lines += scanned.lines
        no_body = self.head.method == b"HEAD" or status in (204, 304)
        self._until_close = scanned.content_length is None and not scanned.chunked and not no_body
        if self._websocket:
            self.head.keep_alive = False  # refused: the client connection cannot go on as HTTP
        if scanned.content_length is not None:
            lines.append(b"Content-Length: %d" % scanned.content_length)
        elif not no_body:
            if self.head.version == "1.1":
                self._chunked_out = True
                lines.append(b"Transfer-Encoding: chunked")
            else:
                self.head.keep_alive = False  # an HTTP/1.0 client reads until close
        if not self.head.keep_alive:
            lines.append(b"Connection: close")
        lines.append(self._server_timing())
        self._response_out.append(b"\r\n".join(lines) + b"\r\n\r\n")
        if self._scan is not None and not no_body:
            self.scanner = self._scan(self, headers)
        return None if no_body else scanned.content_length

    def _server_timing(self) -> bytes:
        """How long the request waited for a slot, and for the model server's answer, in ms."""
        asked, admitted = self.queued_at, self.admitted_at
        sent, answered = self.sent_at, self.first_byte_at
        queue = 0.0 if asked is None or admitted is None else admitted - asked
        upstream = 0.0 if sent is None or answered is None else answered - sent
        return b"Server-Timing: queue;dur=%.3f, upstream;dur=%.3f" % (
            queue * 1000,
            upstream * 1000,
        )

    def switching_protocols(self, reason: bytes, headers: Headers) -> None:
        self._cancel_timer()
        self._replay = None
        self.code = 101
        self.first_byte_at = monotonic()
        if not any(name.lower() == b"x-request-id" for name, _ in headers):
            headers = [*headers, (b"X-Request-ID", self.request_id)]  # returned, as for HTTP
        self._response_out.append(websocket_response_head(101, reason, headers))

    def upgraded(self, upstream: UpstreamConnection, from_upstream: bytes) -> None:
        """The model server accepted the WebSocket: hand both sockets to a tunnel."""
        self.upstream = None
        if not self._websocket or self._on_upgrade is None or upstream.transport is None:
            upstream.close()
            self._response_out.clear()
            self.first_byte_at = None
            return self.fail(UpstreamUnavailable("the model server switched protocols uninvited"))
        self.flush_response()
        # the client's first frames go through the tunnel, which counts them and must see
        # where each frame ends
        from_client, self._early = b"".join(self._early), []
        self._on_upgrade(self, self.conn.detach(), upstream.transport, from_client, from_upstream)

    def tunnel_closed(self) -> None:
        if not self._done:
            self._finish(101)

    def response_body(self, chunk: bytes) -> None:
        if self.scanner is not None:
            self.scanner.feed(chunk)
        if self._chunked_out:
            self._response_out += (b"%x\r\n" % len(chunk), chunk, CHUNK_END)
        else:
            self._response_out.append(chunk)

    def response_end(self) -> None:
        if self._chunked_out:
            self._response_out.append(LAST_CHUNK)
        self.flush_response()
        self._finish(self.code)

    def flush_response(self) -> None:
        if self._response_out:
            out, self._response_out = self._response_out, []
            self.conn.writelines(out)

    def release_upstream(self, upstream: UpstreamConnection, keep_alive: bool) -> bool:
        """The response ended; may `upstream` carry the next request?"""
        self.upstream = None
        return keep_alive and self.request_done and not self._pending

    def upstream_lost(self, upstream: UpstreamConnection) -> None:
        if self._done or upstream is not self.upstream:
            return
        self.upstream = None
        if self.first_byte_at is None and self._replay is not None and self.request_done:
            # a kept-alive connection the model server had just closed: send it again
            self._pending = self._replay + self._pending
            self._replay = None
            self._task = asyncio.ensure_future(self._connect())
            return
        if self.first_byte_at is None:
            return self.fail(UpstreamUnavailable("the model server closed the connection"))
        if self._until_close:
            return self.response_end()  # a body delimited by the connection's close
        # the answer started: the client can only see a cut stream
        self.flush_response()
        self.conn.abort()
        self._finish(self.code)

    # -- internals --------------------------------------------------------------------

    def _queue(self, *pieces: bytes) -> None:
        self._pending += pieces
        if self.upstream is None:
            self._pending_bytes += sum(map(len, pieces))
            if self._pending_bytes > HIGH_WATER and not self._buffering:
                self.conn.pause_reading()

    async def _wait_for_slot(self) -> None:
        try:
            await self._admission.acquire()
        except ProxyError as error:
            self._task = None
            return self.fail(error)
        except asyncio.CancelledError:
            return  # the client left while queued
        if self._done:
            self._admission.release()
            return
        self._on_admitted()
        self.flush()

    def _on_admitted(self) -> None:
        """Take a connection; the caller flushes (start() runs inside a read event, whose
        end flushes the head together with the body that came with it)."""
        self._admitted = True
        self.admitted_at = monotonic()
        upstream = self._pool.take_idle()
        if upstream is not None:
            self._attach(upstream)
        else:
            self._task = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        try:
            upstream = await self._pool.connect()
        except ProxyError as error:
            self._task = None
            return self.fail(error)
        except asyncio.CancelledError:
            return
        self._task = None
        if self._done:
            upstream.close()
            return
        self._attach(upstream)
        self.flush()

    def _attach(self, upstream: UpstreamConnection) -> None:
        self.upstream = upstream
        self.sent_at = monotonic()  # the caller flushes the request to it now
        upstream.begin(self, no_body=self.head.method == b"HEAD")
        self._replay = [] if upstream.reused else None
        if self._request_timeout is not None and self._timer is None:  # a resent one keeps it
            self._timer = self.conn.loop.call_later(self._request_timeout, self._timed_out)
        self.conn.resume_reading()

    def _timed_out(self) -> None:
        self._timer = None
        if self.first_byte_at is None:
            self.fail(UpstreamTimeout())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def fail(self, error: ProxyError) -> None:
        """Answer with the proxy's own error if nothing was sent yet, else cut the stream."""
        if self._done:
            return
        if not self._started:
            # a pipelined request behind others: its answer must wait for its turn
            self._deferred = error
            self._pending = []
            return
        if self.first_byte_at is None:
            self.first_byte_at = monotonic()
            self.conn.respond(
                error.status,
                [*error_headers(error), (b"X-Request-ID", self.request_id)],
                error.body(),
                close=not self.request_done or not self.head.keep_alive,
            )
            self._finish(error.status, error_kind=error.kind)
        else:
            self.conn.abort()
            self._finish(self.code)

    def _finish(self, code: int, error_kind: str | None = None, *, lost: bool = False) -> None:
        self._done = True
        self.code = code
        self.error_kind = error_kind
        self._cancel_timer()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.exchange = None
            upstream.close()  # the model server sees the request cancelled
        if self._admitted:
            self._admitted = False
            self._admission.release()
        self._outcome(self)
        if not lost:
            self.conn.response_done(
                self, keep_alive=self.head.keep_alive, request_done=self.request_done
            )
