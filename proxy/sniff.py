"""The listener's first protocol on every connection: the first bytes tell HTTP/2 with prior
knowledge (its connection preface) from HTTP/1.1, and the socket goes to the one that speaks it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Sniffer(asyncio.Protocol):
    """Holds a connection's first bytes until they are, or cannot be, the HTTP/2 preface,
    then hands the transport and those bytes to `http2()` or `http1()`. A connection that
    sends nothing within `timeout` seconds is closed, as an idle HTTP/1.1 one would be."""

    __slots__ = ("_http1", "_http2", "_pending", "_seen", "_timer", "_transport")

    def __init__(
        self,
        http1: Callable[[], asyncio.Protocol],
        http2: Callable[[], asyncio.Protocol],
        timeout: float,
        pending: set[Sniffer],
    ) -> None:
        self._http1 = http1
        self._http2 = http2
        self._pending = pending  # connections still undecided (the drain closes them)
        self._seen = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._pending.add(self)

    def data_received(self, data: bytes) -> None:
        seen = self._seen + data if self._seen else data
        if len(seen) < len(PREFACE) and PREFACE.startswith(seen):
            self._seen = seen  # "PRI * HT...": wait for the rest ("POST" differs at once)
            return
        protocol = self._http2() if seen.startswith(PREFACE) else self._http1()
        self._handover(protocol, seen)

    def eof_received(self) -> bool | None:
        return None  # closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._pending.discard(self)

    def close(self) -> None:
        self._cancel_timer()
        self._pending.discard(self)
        if self._transport is not None:
            self._transport.close()

    def _handover(self, protocol: asyncio.Protocol, seen: bytes) -> None:
        transport = self._transport
        assert transport is not None
        self._cancel_timer()
        self._pending.discard(self)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if not transport.is_closing():
            protocol.data_received(seen)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self.close()
