"""The send timeout of a client's HTTP/2 connection: a stream whose window the client leaves
shut, or a socket that takes none of our writes, for `client_send_timeout_seconds` is cut.
One timer per connection serves every stall, as `protocol.py`'s moving deadline does."""

from __future__ import annotations

import asyncio
from typing import Protocol


class Stalled(Protocol):
    """The connection, as its send timeout acts on it."""

    def stalled(self, stream_id: int) -> None: ...  # reset it, cancel its call
    def abort(self) -> None: ...


class SendStalls:
    """When each stream last sent a byte while it had more to send, and since when the socket
    has been full; one loop timer wakes at the earliest deadline and cuts what overran it."""

    __slots__ = ("_connection", "_loop", "_since", "_socket_since", "_timeout", "_timer")

    def __init__(self, connection: Stalled, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._since: dict[int, float] = {}  # streams waiting for a window, since when
        self._socket_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def flow(self, stream_id: int, sent: int, waiting: bool) -> None:
        """The stream sent `sent` bytes as its windows allowed; `waiting`: some are left."""
        if waiting:
            if sent or stream_id not in self._since:  # a byte taken: the wait starts over
                self._since[stream_id] = self._loop.time()
                self._arm()
        elif self._since:
            self._since.pop(stream_id, None)

    def socket_stalled(self) -> None:
        if self._socket_since is None:
            self._socket_since = self._loop.time()
            self._arm()

    def socket_flowing(self) -> None:
        self._socket_since = None

    def stop(self) -> None:
        self._since.clear()
        self._socket_since = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        expired = self._loop.time() - self._timeout  # a stall that began by then is over
        if self._socket_since is not None and self._socket_since <= expired:
            self._connection.abort()  # its streams are lost with it
            return
        earliest = self._socket_since
        for stream_id, since in list(self._since.items()):
            if since <= expired:
                # (a stream reset meanwhile may still be listed: cutting it does nothing)
                del self._since[stream_id]
                self._connection.stalled(stream_id)
            elif earliest is None or since < earliest:
                earliest = since
        if earliest is not None and self._timer is None:
            self._timer = self._loop.call_at(earliest + self._timeout, self._check)
