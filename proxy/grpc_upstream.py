"""The model server's gRPC port: HTTP/2 connections to it (cleartext, prior knowledge), each
carrying many calls at once, and the pool that opens them as calls need streams."""

from __future__ import annotations

import asyncio
from typing import Protocol

from .errors import UpstreamUnavailable
from .h2conn import H2Endpoint
from .h2fields import malformed_trailers
from .h2frames import CANCEL, PROTOCOL_ERROR, Headers
from .upstream import connect_to_model_server

LAST_STREAM_ID = 2**31 - 1
SETTINGS_TIMEOUT = 10.0  # a new connection's wait for the server's SETTINGS


class ResponseSink(Protocol):
    """One call's response, as the upstream connection delivers it."""

    def response_headers(self, headers: Headers, end: bool) -> None: ...
    def response_data(self, data: bytes) -> None: ...  # acknowledge it (ack) once taken
    def response_trailers(self, headers: Headers) -> None: ...
    def response_end(self) -> None: ...  # the stream ended without trailers
    def upstream_reset(self, code: int | None) -> None: ...  # None: the connection is gone
    def request_sent(self, size: int) -> None: ...  # request bytes the server's window took


class UpstreamConnection(H2Endpoint):
    """One HTTP/2 connection to the model server; a sink per open stream."""

    def __init__(self, pool: GrpcUpstream) -> None:
        super().__init__(client_side=True)
        self._pool = pool
        self._sinks: dict[int, ResponseSink] = {}
        self.going_away = False
        # the server's first SETTINGS: until then its stream limit is unknown (a strict one
        # ends the whole connection when a burst of calls goes past it)
        self.settled: asyncio.Future[None] = self._loop.create_future()

    @property
    def has_room(self) -> bool:
        return (
            not self.lost
            and not self.going_away
            and len(self._sinks) < self.peer_max_streams
            and self.next_stream_id < LAST_STREAM_ID
        )

    def open_call(self, headers: Headers, sink: ResponseSink) -> int:
        """A stream for one call; `sink` hears of its response."""
        stream_id = self.open_stream(headers)
        self.set_on_sent(stream_id, sink.request_sent)
        self._sinks[stream_id] = sink
        return stream_id

    def close_stream(self, stream_id: int) -> None:
        """The call is over for the proxy: cancel the stream if it is still open."""
        self._sinks.pop(stream_id, None)
        self.reset(stream_id, CANCEL)  # nothing is sent for a stream closed both ways
        self._maybe_close()

    def on_settings(self, settings: list[tuple[int, int]]) -> None:
        super().on_settings(settings)
        if not self.settled.done():
            self.settled.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.settled.done():
            self.settled.set_exception(
                UpstreamUnavailable("the model server closed the connection")
            )
        self._pool.forget(self)
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink.upstream_reset(None)

    # -- the protocol's events --------------------------------------------------------

    def _on_headers(self, stream_id: int, headers: Headers, end: bool, first: bool) -> None:
        if first:
            sink = self._sinks.pop(stream_id) if end else self._sinks.get(stream_id)
            if sink is not None:
                sink.response_headers(headers, end)  # end: trailers-only
        elif malformed_trailers(headers):
            # passed on, the client could take them for an error of its whole connection
            self._stream_error(stream_id, PROTOCOL_ERROR)
        else:
            sink = self._sinks.pop(stream_id, None)
            if sink is not None:
                sink.response_trailers(headers)
        self._maybe_close()

    def _on_data(self, stream_id: int, data: bytes) -> None:
        sink = self._sinks.get(stream_id)
        if sink is None:
            self.ack(stream_id, len(data))
        else:
            sink.response_data(data)

    def _on_end(self, stream_id: int) -> None:
        sink = self._sinks.pop(stream_id, None)  # none: it ended with its trailers
        if sink is not None:
            sink.response_end()
            self._maybe_close()

    def _on_reset(self, stream_id: int, code: int) -> None:
        sink = self._sinks.pop(stream_id, None)
        if sink is not None:
            sink.upstream_reset(code)
            self._maybe_close()

    def _on_goaway(self, last_stream_id: int, code: int) -> None:
        """Streams above `last_stream_id` were never processed; without error the rest
        go on, with one the connection is over."""
        self.going_away = True
        self._pool.forget(self)
        for stream_id in [sid for sid in self._sinks if code or sid > last_stream_id]:
            self._sinks.pop(stream_id).upstream_reset(None)
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.going_away and not self._sinks:
            self.close()


class GrpcUpstream:
    """HTTP/2 connections to 127.0.0.1:`port`; a call takes a stream on one with room."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.connections: list[UpstreamConnection] = []
        self._connecting: asyncio.Future[UpstreamConnection] | None = None

    def take(self) -> UpstreamConnection | None:
        for connection in self.connections:
            if connection.has_room:
                return connection
        return None

    async def connect(self) -> UpstreamConnection:
        """A connection with room for one more stream, opened when none has any. Calls that
        ask while one is being opened wait for it, and take its room in turn; those it has
        none for open the next."""
        while True:
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._open())
                self._connecting.add_done_callback(self._opened)
            await asyncio.shield(self._connecting)
            connection = self.take()
            if connection is not None:
                return connection

    async def _open(self) -> UpstreamConnection:
        connection = await connect_to_model_server(
            lambda: UpstreamConnection(self), self.host, self.port
        )
        try:
            async with asyncio.timeout(SETTINGS_TIMEOUT):
                await connection.settled
        except TimeoutError:
            connection.abort()
            raise UpstreamUnavailable(
                "the model server's gRPC port does not speak HTTP/2"
            ) from None
        except asyncio.CancelledError:  # closed while opening: no one will use this connection
            connection.abort()
            raise
        if not connection.has_room:  # it takes no streams at all: opening more will not help
            connection.abort()
            raise UpstreamUnavailable("the model server takes no new streams")
        self.connections.append(connection)
        return connection

    def _opened(self, future: asyncio.Future[UpstreamConnection]) -> None:
        self._connecting = None
        if not future.cancelled():
            future.exception()  # retrieved: each waiter has it raised already

    def forget(self, connection: UpstreamConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)

    def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        connections, self.connections = self.connections, []
        for connection in connections:
            connection.abort()
