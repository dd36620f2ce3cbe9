"""Per-stream timeouts of a client's HTTP/2 connection, one loop timer for all of them (as
`protocol.py`'s moving deadline is one per connection): a stream that waits on the client and
sees no progress for its timeout is cut. Two uses: the send timeout (a stream whose window the
client leaves shut, or a socket that takes none of our writes, for
`client_send_timeout_seconds`) and the body timeout (a call whose first message stops
arriving for `client_body_timeout_seconds`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Stalls:
    """When each waiting stream last made progress, and since when the socket has been full;
    one loop timer wakes at the earliest deadline and cuts what overran it."""

    __slots__ = (
        "_loop",
        "_on_socket",
        "_on_stream",
        "_since",
        "_socket_since",
        "_timeout",
        "_timer",
    )

    def __init__(
        self,
        timeout: float,
        on_stream: Callable[[int], None],
        on_socket: Callable[[], None] | None = None,
    ) -> None:
        self._timeout = timeout
        self._on_stream = on_stream  # a stream overran: cut it
        self._on_socket = on_socket  # the socket overran: cut the connection (if it is watched)
        self._loop = asyncio.get_running_loop()
        self._since: dict[int, float] = {}  # streams waiting, since their last progress
        self._socket_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def flow(self, stream_id: int, progress: int, waiting: bool) -> None:
        """The stream moved `progress` bytes; `waiting`: it still waits on the client."""
        if waiting:
            if progress or stream_id not in self._since:  # progress: the wait starts over
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
            if self._on_socket is not None:
                self._on_socket()  # its streams are lost with it
            return
        earliest = self._socket_since
        for stream_id, since in list(self._since.items()):
            if since <= expired:
                # (a stream ended meanwhile may still be listed: cutting it does nothing)
                del self._since[stream_id]
                self._on_stream(stream_id)
            elif earliest is None or since < earliest:
                earliest = since
        if earliest is not None and self._timer is None:
            self._timer = self._loop.call_at(earliest + self._timeout, self._check)
