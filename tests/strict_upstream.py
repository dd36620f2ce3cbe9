"""A model server that parses with h11 — strict, and independent of the proxy's llhttp — and
records exactly what reaches it: every request, in order, its body, any protocol violation,
and the raw bytes of an accepted WebSocket tunnel. The smuggling tests put it behind the
proxy and compare what it saw with what the client sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

import h11


@dataclass
class Seen:
    """One request as the model server parsed it."""

    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)

    def header(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]

    @property
    def request_id(self) -> bytes:
        ids = self.header(b"x-request-id")
        return ids[0] if len(ids) == 1 else b"?"


class StrictUpstream:
    """Answers every request 200 with its body echoed and `x-upstream: h11`; a WebSocket
    handshake gets 101 when `accept_websocket`, and what follows is recorded as tunnel bytes."""

    def __init__(self, *, accept_websocket: bool = False) -> None:
        self.accept_websocket = accept_websocket
        self.requests: list[Seen] = []
        self.violations: list[str] = []
        self.tunnel = bytearray()
        self.changed = asyncio.Event()  # something was recorded

    def record(self) -> None:
        self.changed.set()

    async def until(self, done: object) -> None:
        """Until `done()` holds (a callable), each time something is recorded."""
        assert callable(done)
        while not done():
            self.changed.clear()
            await self.changed.wait()


class _Connection(asyncio.Protocol):
    def __init__(self, upstream: StrictUpstream) -> None:
        self.upstream = upstream
        self.h11 = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.current: Seen | None = None
        self.tunnel = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            self.upstream.tunnel += data
            self.upstream.record()
            return
        self.h11.receive_data(data)
        self.events()

    def eof_received(self) -> bool | None:
        if not self.tunnel:
            self.h11.receive_data(b"")
            self.events()
        return None

    def events(self) -> None:
        assert self.transport is not None
        while not self.tunnel:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as error:
                self.upstream.violations.append(repr(error))
                self.upstream.record()
                self.transport.close()
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.current = Seen(event.method, event.target, list(event.headers))
            elif isinstance(event, h11.Data):
                assert self.current is not None
                self.current.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self.current is not None
                self.upstream.requests.append(self.current)
                self.upstream.record()
                self.answer(self.current)
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def answer(self, seen: Seen) -> None:
        assert self.transport is not None
        websocket = [value.strip().lower() for value in seen.header(b"upgrade")] == [b"websocket"]
        if websocket and self.upstream.accept_websocket:
            switch = h11.InformationalResponse(
                status_code=101, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")]
            )
            self.transport.write(self.h11.send(switch))
            self.tunnel = True
            rest, _ = self.h11.trailing_data
            if rest:
                self.upstream.tunnel += rest
                self.upstream.record()
            return
        headers = [
            ("Content-Length", str(len(seen.body))),
            ("X-Upstream", "h11"),
            ("X-Request-ID", seen.request_id),
        ]
        out = self.h11.send(h11.Response(status_code=200, headers=headers))
        out += self.h11.send(h11.Data(data=bytes(seen.body)))
        out += self.h11.send(h11.EndOfMessage())
        self.transport.write(out)
        if self.h11.our_state is h11.MUST_CLOSE:
            self.transport.close()
        else:
            self.h11.start_next_cycle()


@asynccontextmanager
async def strict_upstream(upstream: StrictUpstream) -> AsyncIterator[int]:
    """Serve `upstream` on 127.0.0.1; yields its port."""
    connections: list[_Connection] = []

    def protocol() -> _Connection:
        connections.append(_Connection(upstream))
        return connections[-1]

    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for connection in connections:
            if connection.transport is not None:
                connection.transport.abort()
        await server.wait_closed()
