"""Keep-alive connections to the model server on 127.0.0.1: the pool, and each connection's
response parser, which hands what it reads to the exchange using the connection.

Each response's body is passed on as it is read: after its head, a Content-Length body
bypasses llhttp (which would only copy it); a connection goes back to the pool only after a
complete response (and, the exchange says, a complete request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar, cast

import httptools

from .errors import UpstreamUnavailable
from .framing import Headers
from .protocol import WRITE_HIGH_WATER, WRITE_LOW_WATER

if TYPE_CHECKING:
    from .forward import ProxyExchange

MAX_IDLE = 512
_Protocol = TypeVar("_Protocol", bound=asyncio.Protocol)


async def connect_to_model_server(
    protocol: Callable[[], _Protocol], host: str, port: int
) -> _Protocol:
    """A new connection to the model server, HTTP/1.1 or HTTP/2 as `protocol` speaks; a
    refusal is the request's 502 (or gRPC's UNAVAILABLE)."""
    loop = asyncio.get_running_loop()
    try:
        _, connection = await loop.create_connection(protocol, host, port)
    except OSError as exc:
        raise UpstreamUnavailable(f"cannot connect to the model server: {exc}") from exc
    return connection


class UpstreamPool:
    """Keep-alive connections to the model server on 127.0.0.1, reused newest first."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}".encode()
        self._idle: list[UpstreamConnection] = []

    def take_idle(self) -> UpstreamConnection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                return connection
        return None

    async def connect(self) -> UpstreamConnection:
        return await connect_to_model_server(lambda: UpstreamConnection(self), self.host, self.port)

    def put_back(self, connection: UpstreamConnection) -> None:
        if len(self._idle) < MAX_IDLE:
            connection.reused = True
            self._idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: UpstreamConnection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class UpstreamConnection(asyncio.Protocol):
    """One connection to the model server; parses responses for the exchange using it."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: ProxyExchange | None = None
        self.reused = False
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._reason = b""
        self._interim = False  # a 1xx answer; the real one follows
        self._lost = False
        self._no_body = False
        # a Content-Length body still to come: passed on as read, without llhttp, which
        # would only copy it; the parser is replaced before the next response
        self._body_left = 0
        self._keep_alive = False
        self._parser_spent = False

    @property
    def usable(self) -> bool:
        return not self._lost and self.transport is not None and not self.transport.is_closing()

    def begin(self, exchange: ProxyExchange, *, no_body: bool) -> None:
        self.exchange = exchange
        if self._parser_spent:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_spent = False
        # llhttp cannot be told that a HEAD answer has no body: its parser is dropped after
        self._no_body = no_body

    def write(self, pieces: list[bytes]) -> None:
        assert self.transport is not None
        self.transport.writelines(pieces)

    def close(self) -> None:
        self._lost = True
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_lost(self)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # nobody asked: a protocol error of the model server
            return
        if self._body_left:
            return self._pass_body(exchange, data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.exchange = None
            exchange.upgraded(self, data[upgrade.args[0] :])
            return
        except httptools.HttpParserError:
            self.close()
            exchange.upstream_lost(self)
            return
        if self._body_left:
            self._parser_spent = True  # it stopped mid-body; the rest bypasses it
        exchange.flush_response()

    def _pass_body(self, exchange: ProxyExchange, data: bytes) -> None:
        if len(data) > self._body_left:
            # more than the response announced: answer what was announced, drop the socket
            data = data[: self._body_left]
            self._keep_alive = False
        self._body_left -= len(data)
        exchange.response_body(data)
        if self._body_left:
            exchange.flush_response()
        else:
            self._message_done(keep_alive=self._keep_alive)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.conn.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.conn.resume_reading()

    # -- llhttp callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._interim = 100 <= status < 200  # 1xx: the real answer follows (101: a tunnel)
        if self.exchange is None:
            return
        if status == 101:
            self.exchange.switching_protocols(self._reason, self._headers)
            return
        if self._interim:
            return
        length = self.exchange.response_head(status, self._reason, self._headers)
        self._keep_alive = self._parser.should_keep_alive()
        if self._no_body:
            self._parser_spent = True
            self._message_done(keep_alive=self._keep_alive)
        else:
            self._body_left = length or 0

    def on_body(self, body: bytes) -> None:
        if self._body_left:  # a Content-Length body (chunked ones are not counted)
            self._body_left -= len(body)
        if self.exchange is not None:
            self.exchange.response_body(body)

    def on_message_complete(self) -> None:
        if self._interim or self._no_body:
            return
        self._body_left = 0
        self._message_done(keep_alive=self._parser.should_keep_alive())

    def _message_done(self, *, keep_alive: bool) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is None:
            return
        if exchange.release_upstream(self, keep_alive):
            self._pool.put_back(self)
        else:
            self.close()
        exchange.response_end()
