"""The client side of HTTP/2 (cleartext, prior knowledge): one connection's streams, each
request handed to a handler the router picks, its response sent back as the windows allow."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import h2.events

from .h2conn import CANCEL, NO_ERROR, REFUSED_STREAM, H2Endpoint, Headers


class StreamHandler(Protocol):
    """One request stream, as the connection drives it."""

    def request_data(self, data: bytes) -> None: ...  # acknowledge it (conn.ack) once taken
    def request_end(self) -> None: ...
    def client_reset(self) -> None: ...  # RST_STREAM from the client, or its connection lost


class H2Request:
    """A request's headers, with the few the proxy reads picked out in one pass."""

    __slots__ = (
        "authorization",
        "client_ip",
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

    @property
    def grpc(self) -> bool:
        return self.content_type.startswith(b"application/grpc")


Router = Callable[[H2Request, "H2ServerConnection"], StreamHandler]


class H2ServerConnection(H2Endpoint):
    """One client's HTTP/2 connection: a handler per open stream; GOAWAY when draining."""

    def __init__(
        self,
        router: Router,
        connections: set[H2ServerConnection],
        *,
        idle_timeout: float,
    ) -> None:
        # the client's headers go on to the model server: h2 checks them on the way in
        super().__init__(client_side=False, validate_inbound=True)
        self._router = router
        self._connections = connections
        self._idle_timeout = idle_timeout
        self._handlers: dict[int, StreamHandler] = {}
        self._request_open: set[int] = set()  # streams whose request has not ended yet
        self._going_away = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self.client_ip = ""
        self.loop = asyncio.get_running_loop()

    @property
    def streams(self) -> int:
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
        handlers, self._handlers = self._handlers, {}
        for handler in handlers.values():
            handler.client_reset()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            handler = self._handlers.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                self.ack(event.stream_id, padding)  # nobody else will take it
            if handler is None:
                self.ack(event.stream_id, len(event.data))
            elif event.data:
                handler.request_data(event.data)
        elif isinstance(event, h2.events.RequestReceived):
            self._request(event.stream_id, event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            self._request_open.discard(event.stream_id)
            handler = self._handlers.get(event.stream_id)
            if handler is not None:
                handler.request_end()
        elif isinstance(event, h2.events.StreamReset):
            self._request_open.discard(event.stream_id)
            self._outbound.pop(event.stream_id, None)
            handler = self._handlers.pop(event.stream_id, None)
            if handler is not None:
                handler.client_reset()
                self._stream_gone()
        elif isinstance(event, h2.events.ConnectionTerminated):
            if event.error_code:  # h2 closed the connection: nothing more can pass
                self.close()
                return
            self._going_away = True  # the client opens no more streams; its open ones go on
            self._stream_gone()

    def _request(self, stream_id: int, headers: Headers) -> None:
        if self._going_away:
            self.reset(stream_id, REFUSED_STREAM)  # never processed: safe to retry elsewhere
            return
        self._cancel_idle_timer()
        self._request_open.add(stream_id)
        self.track(stream_id, None)
        request = H2Request(stream_id, headers, self.client_ip)
        handler = self._router(request, self)
        if stream_id in self._outbound:  # not answered whole at once (a refusal is)
            self._handlers[stream_id] = handler
        else:
            self._stream_gone()

    def set_on_sent(self, stream_id: int, on_sent: Callable[[int], None]) -> None:
        """Hear of the response bytes the client's window let out (to acknowledge them)."""
        out = self._outbound.get(stream_id)
        if out is not None:
            out.on_sent = on_sent

    def _ended(self, stream_id: int) -> None:
        """The response is sent whole: the stream is done for the proxy."""
        super()._ended(stream_id)
        if stream_id in self._request_open:
            # the answer came before the request ended (a refusal, a server that stops
            # early): tell the client to stop sending, without error (RFC 9113 §8.1)
            self._request_open.discard(stream_id)
            self.reset(stream_id, NO_ERROR)
        if self._handlers.pop(stream_id, None) is not None:
            self._stream_gone()

    def go_away(self) -> None:
        """The drain: no new streams (GOAWAY); close once the open ones are done."""
        if self.lost or self._going_away:
            return
        self._going_away = True
        self.send_goaway(self.h2.highest_inbound_stream_id)
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
        self._cancel_idle_timer()
        self._idle_timer = self.loop.call_later(self._idle_timeout, self._idle)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if not self._handlers:
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

    def request_end(self) -> None:
        pass

    def client_reset(self) -> None:
        pass
