"""The client side of HTTP/2 (cleartext, prior knowledge): one connection's streams, each
request handed to a handler the router picks, its response sent back as the windows allow."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, MutableSet
from typing import Protocol

from .h2conn import H2Endpoint
from .h2fields import malformed, malformed_trailers
from .h2frames import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    Headers,
)
from .h2stalls import Stalls


class StreamHandler(Protocol):
    """One request stream, as the connection drives it."""

    def request_data(self, data: bytes) -> None: ...  # acknowledge it (conn.ack) once taken
    def request_trailers(self, headers: Headers) -> None: ...  # request_end follows
    def request_end(self) -> None: ...
    # RST_STREAM from the client, its connection lost, or a stream it left unread too long
    def client_reset(self) -> None: ...
    # what it awaits of the request (awaiting_request) stopped coming for the body timeout
    def request_stalled(self) -> None: ...


class H2Request:
    """A request's headers, with the few the proxy reads picked out in one pass."""

    __slots__ = (
        "authorization",
        "client_ip",
        "content_length",
        "content_type",
        "headers",
        "method",
        "path",
        "request_id",
        "stream_id",
    )

    def __init__(self, stream_id: int, headers: Headers, client_ip: str) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.client_ip = client_ip
        self.method = self.path = b""
        self.content_type = b""
        self.authorization: bytes | None = None
        self.request_id: bytes | None = None
        self.content_length: int | None = None  # well-formed: `malformed` checked it
        for name, value in headers:
            if name == b":method":
                self.method = value
            elif name == b":path":
                self.path = value
            elif name == b"content-type":
                self.content_type = value
            elif name == b"authorization":
                self.authorization = value
            elif name == b"x-request-id":
                self.request_id = value
            elif name == b"content-length":
                self.content_length = int(value)

    @property
    def grpc(self) -> bool:
        return self.content_type.startswith(b"application/grpc")


Router = Callable[[H2Request, "H2ServerConnection"], StreamHandler]
MAX_CANCEL_DEBT = 1000  # cancelled streams beyond those completed before a connection is cut


class H2ServerConnection(H2Endpoint):
    """One client's HTTP/2 connection: a handler per open stream; GOAWAY when draining."""

    def __init__(
        self,
        router: Router,
        connections: MutableSet[H2ServerConnection],
        *,
        idle_timeout: float,
        send_timeout: float,
        body_timeout: float,
    ) -> None:
        super().__init__(client_side=False)
        self._router = router
        self._connections = connections
        self._idle_timeout = idle_timeout
        self._handlers: dict[int, StreamHandler] = {}
        self._going_away = False
        # streams the client cancelled (or the proxy reset for breaking the rules) less those
        # that ran to their end: a client that opens and cancels streams by the thousand
        # ("rapid reset", CVE-2023-44487) makes the model server start and stop work for
        # nothing, and malformed ones cost a header block's decoding each
        self._cancel_debt = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # loop time the last stream ended
        self._send_stalls = Stalls(send_timeout, self.stalled, self.abort)
        self._body_stalls = Stalls(body_timeout, self._body_stalled)
        self.client_ip = ""
        self.loop = asyncio.get_running_loop()

    @property
    def active_streams(self) -> int:
        return len(self._handlers)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self._connections.add(self)
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._connections.discard(self)
        self._cancel_idle_timer()
        self._send_stalls.stop()
        self._body_stalls.stop()
        self._drop_handlers()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._send_stalls.socket_stalled()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._send_stalls.socket_flowing()  # (closing, the rest must go all the same)
        super().resume_writing()

    def close(self) -> None:
        super().close()
        if self.transport is not None and self.transport.get_write_buffer_size():
            self._send_stalls.socket_stalled()  # the last bytes must go within the timeout

    def reset_stream(self, stream_id: int, code: int) -> None:
        """A handler resets its own stream: it is done with it, as when its response ends."""
        self.reset(stream_id, code)
        if self._handlers.pop(stream_id, None) is not None:
            self._stream_gone()

    # -- the protocol's events --------------------------------------------------------

    def _on_headers(self, stream_id: int, headers: Headers, end: bool, first: bool) -> None:
        if not first:  # the request's trailers
            handler = self._handlers.get(stream_id)
            if handler is None:
                return
            if malformed_trailers(headers):
                self._stream_error(stream_id, PROTOCOL_ERROR)
            else:
                handler.request_trailers(headers)
            return
        if self._going_away:
            self.reset(stream_id, REFUSED_STREAM)  # never processed: safe to retry elsewhere
            return
        if malformed(headers):
            self._stream_error(stream_id, PROTOCOL_ERROR)  # RFC 9113 §8.1.1
            return
        handler = self._router(H2Request(stream_id, headers, self.client_ip), self)
        self._handlers[stream_id] = handler
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:  # answered whole at once: a refusal
            self._ended(stream_id)

    def _on_data(self, stream_id: int, data: bytes) -> None:
        handler = self._handlers.get(stream_id)
        if handler is None:
            self.ack(stream_id, len(data))
        else:
            handler.request_data(data)

    def _on_end(self, stream_id: int) -> None:
        handler = self._handlers.get(stream_id)
        if handler is not None:
            handler.request_end()

    def _on_reset(self, stream_id: int, code: int) -> None:
        handler = self._handlers.pop(stream_id, None)
        if handler is not None:
            handler.client_reset()
        self._charge()

    def _on_goaway(self, last_stream_id: int, code: int) -> None:
        if code:  # the client gave up on the connection
            self.close()
            return
        self._going_away = True  # it opens no more streams; its open ones go on
        self._stream_gone()

    def _ended(self, stream_id: int) -> None:
        """The response is sent whole: the stream is done for the proxy."""
        if self._handlers.pop(stream_id, None) is None:
            return
        self._cancel_debt = max(self._cancel_debt - 1, 0)
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.remote_closed:
            # the answer came before the request ended (a refusal, a server that stops
            # early): tell the client to stop sending, without error (RFC 9113 §8.1)
            self.reset(stream_id, NO_ERROR)
        self._stream_gone()

    def _flow(self, stream_id: int, sent: int, waiting: bool) -> None:
        self._send_stalls.flow(stream_id, sent, waiting)

    def _fail(self, code: int, message: str) -> None:
        """A connection error: its streams are over at once, the model server's calls too."""
        super()._fail(code, message)
        self._drop_handlers()

    def _charge(self) -> None:
        """A stream ended by a reset: past the limit, the client is abusing the connection."""
        self._cancel_debt += 1
        if self._cancel_debt > MAX_CANCEL_DEBT:
            self._fail(ENHANCE_YOUR_CALM, "too many streams cancelled")
        else:
            self._stream_gone()

    def _drop_handlers(self) -> None:
        handlers, self._handlers = self._handlers, {}
        for handler in handlers.values():
            handler.client_reset()

    # -- the send timeout ---------------------------------------------------------------

    def stalled(self, stream_id: int) -> None:
        """The client left the stream's window shut for the send timeout: it is reset, and
        its call at the model server cancelled, as if the client had cancelled it."""
        handler = self._handlers.pop(stream_id, None)
        self.reset(stream_id, CANCEL)
        if handler is not None:
            handler.client_reset()
            self._stream_gone()

    # -- the body timeout -------------------------------------------------------------

    def awaiting_request(self, stream_id: int, progress: int, waiting: bool) -> None:
        """The stream's handler awaits more of the request (`progress` bytes of it came) or,
        `waiting` False, no longer: a pause over the body timeout stalls it."""
        self._body_stalls.flow(stream_id, progress, waiting)

    def _body_stalled(self, stream_id: int) -> None:
        handler = self._handlers.get(stream_id)
        if handler is not None:
            handler.request_stalled()

    # -- the drain --------------------------------------------------------------------

    def go_away(self) -> None:
        """No new streams (GOAWAY); close once the open ones are done."""
        if self.lost or self._going_away:
            return
        self._going_away = True
        self.send_goaway(self.highest_inbound)
        self._stream_gone()

    def cut(self) -> None:
        """The drain's grace is over: reset what is still open, and close."""
        handlers, self._handlers = self._handlers, {}
        for stream_id, handler in handlers.items():
            handler.client_reset()
            self.reset(stream_id, CANCEL)
        self.close()

    def _stream_gone(self) -> None:
        if self._handlers:
            return
        if self._going_away:
            self.close()
        else:
            self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        """The connection times out `idle_timeout` after its last stream ended. One timer
        serves many idle spells: it wakes, finds streams or a later deadline, and sleeps
        again (a timer set and cancelled per call costs more than the call's bookkeeping)."""
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self._idle_timeout, self._idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if self._handlers or self.lost:
            return  # busy: the last stream to end arms it again
        left = self._idle_since + self._idle_timeout - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle)
        else:
            self.go_away()


class LocalResponse:
    """A response the proxy writes itself over HTTP/2 (its endpoints and its errors)."""

    __slots__ = ()

    def __init__(
        self,
        conn: H2ServerConnection,
        stream_id: int,
        status: int,
        headers: Headers,
        body: bytes,
        head_only: bool = False,
    ) -> None:
        lines = [(b":status", b"%d" % status)]
        lines += [(name.lower(), value) for name, value in headers]
        lines.append((b"content-length", b"%d" % len(body)))
        if head_only or not body:
            conn.send_headers(stream_id, lines, end_stream=True)
            return
        conn.send_headers(stream_id, lines)
        conn.send_data(stream_id, body)
        conn.end_stream(stream_id)

    def request_data(self, data: bytes) -> None:
        pass  # nobody reads it; the connection acknowledges it once the stream is done

    def request_trailers(self, headers: Headers) -> None:
        pass

    def request_end(self) -> None:
        pass

    def client_reset(self) -> None:
        pass

    def request_stalled(self) -> None:
        pass  # answered whole at once: it awaits nothing
