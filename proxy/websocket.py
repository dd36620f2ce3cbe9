"""The WebSocket bridge: after the model server's 101, bytes flow both ways untouched
(frames, fragments, pings, close codes, extensions), while frame headers are read on the
way to count messages, to time idle tunnels out, and to know where a frame of the proxy's
own (a close at shutdown, a keepalive ping) may be slipped in."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from .frames import PING, FrameReader, close_frame, control_frame

CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"
GOING_AWAY = 1001
CLOSE_LINGER = 2.0  # how long peers may take to answer our close frame
IDLE_CHECKS = 4  # idle checks per idle timeout: one is closed within a quarter more of it
KEEPALIVE = b"model-proxy keepalive"  # every ping's payload: any pong with it is ours
_SLACK = 0.001  # a timer may wake this much early (the loop's clock ticks in milliseconds)

log = logging.getLogger("model_proxy")


@dataclass(frozen=True, slots=True)
class Timers:
    """How long a tunnel may stay quiet. None: no limit, no keepalive."""

    idle_timeout: float | None = None  # no data frame either way this long: closed (1001)
    ping_interval: float | None = None  # the client sent nothing this long: pinged
    ping_timeout: float | None = None  # our ping unanswered this long: closed (1001)


class _Side(asyncio.Protocol):
    """One end of the tunnel: what it reads goes to the other end as it is."""

    def __init__(self, tunnel: Tunnel, direction: str, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.direction = direction
        self.transport = transport
        self.frames = FrameReader()
        self.closed = False
        self.eof = False  # this side's peer will send nothing more
        self.pending = False  # a frame of the proxy's own waits for a boundary toward the peer
        self.pending_ping: bytes | None = None
        self.pending_close: bytes | None = None
        self.sent_close = False  # after our close frame the peer gets no more frames
        self.other: _Side

    def data_received(self, data: bytes) -> None:
        frames = self.frames
        if frames.watching:  # the proxy's ping awaits its pong, which must not pass
            messages, data, answered = frames.feed_watching(data)
            if answered:
                self.tunnel.pong_received()
        else:
            messages = frames.feed(data)
        if messages:
            self.tunnel.on_messages(self.direction, messages)
        if data and not self.other.sent_close:
            self.other.transport.write(data)
        if self.other.pending and frames.at_boundary:
            self.other.send_pending_to_peer()

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.other.eof or self.other.transport.is_closing():
            self.other.transport.close()
            return None  # both directions ended: close this socket too
        self.other.transport.write_eof()
        return True  # the other direction may still carry the closing handshake

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.other.transport.close()  # flushes what was already passed on
        self.tunnel.side_closed()

    def pause_writing(self) -> None:
        self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.other.transport.resume_reading()

    # -- frames of the proxy's own toward this side's peer --------------------------

    def queue_ping(self, frame: bytes) -> None:
        """Send `frame` to this side's peer as soon as no frame toward it is half-sent."""
        self.pending_ping = frame
        self.pending = True
        if self.other.frames.at_boundary:
            self.send_pending_to_peer()

    def queue_close(self, frame: bytes) -> None:
        """Send `frame` to this side's peer as soon as no frame toward it is half-sent."""
        self.pending_close = frame
        self.pending = True
        if self.other.frames.at_boundary:
            self.send_pending_to_peer()

    def send_pending_to_peer(self) -> None:
        self.pending = False
        ping, self.pending_ping = self.pending_ping, None
        close, self.pending_close = self.pending_close, None

        if self.transport.is_closing() or self.other.eof or self.sent_close:
            return
        if ping is not None:
            self.transport.write(ping)
            self.tunnel.ping_sent()
        if close is not None:
            self.transport.write(close)
            self.sent_close = True


class Tunnel:
    """A client socket and a model server socket joined after a WebSocket handshake."""

    def __init__(
        self,
        client: asyncio.BaseTransport,
        upstream: asyncio.BaseTransport,
        *,
        on_messages: Callable[[str, int], None],
        on_closed: Callable[[Tunnel], None],
        timers: Timers = Timers(),
    ) -> None:
        self.on_messages = on_messages
        self._on_closed = on_closed
        self._timers = timers
        # from the client's socket to the model server, and back
        self._client = _Side(self, CLIENT_TO_UPSTREAM, cast(asyncio.Transport, client))
        self._upstream = _Side(self, UPSTREAM_TO_CLIENT, cast(asyncio.Transport, upstream))
        self._client.other, self._upstream.other = self._upstream, self._client
        self._done = False
        self._closing = False
        self._linger: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        # one timer for every limit, at the earliest of their next checks; the stream only
        # raises flags (FrameReader.data_seen, .heard), which the timer reads when it fires
        self._timer: asyncio.TimerHandle | None = None
        now = self._loop.time()
        self._quiet_since = now  # the last check that found a data frame gone by
        self._next_idle_check = now + (timers.idle_timeout or 0) / IDLE_CHECKS
        self._next_ping = now + (timers.ping_interval or 0)
        self._ping_sent_at: float | None = None
        client.set_protocol(self._client)
        upstream.set_protocol(self._upstream)

    def start(self, from_client: bytes, from_upstream: bytes) -> None:
        """Pass on what either side sent before the tunnel existed, then resume reading."""
        if from_upstream:
            self._upstream.data_received(from_upstream)
        if from_client:
            self._client.data_received(from_client)
        self._client.transport.resume_reading()
        self._upstream.transport.resume_reading()
        self._arm()

    def going_away(self, reason: bytes = b"proxy shutting down") -> None:
        """Shutdown: close both ends with 1001, then cut the sockets if the peers linger."""
        self._closing = True
        self._stop_timer()
        self._client.queue_close(close_frame(GOING_AWAY, reason, masked=False))
        self._upstream.queue_close(close_frame(GOING_AWAY, reason, masked=True))
        if self._linger is None:
            self._linger = self._loop.call_later(CLOSE_LINGER, self.abort)

    def abort(self) -> None:
        self._client.transport.abort()
        self._upstream.transport.abort()

    def side_closed(self) -> None:
        if self._done or not (self._client.closed and self._upstream.closed):
            return
        self._done = True
        self._stop_timer()
        if self._linger is not None:
            self._linger.cancel()
        self._on_closed(self)

    # -- idle timeout and keepalive ---------------------------------------------------

    def ping_sent(self) -> None:
        self._ping_sent_at = self._loop.time()
        self._arm()  # its answer has a deadline now

    def pong_received(self) -> None:
        self._ping_sent_at = None

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        timers = self._timers
        checks = []
        if timers.idle_timeout is not None:
            checks.append(self._next_idle_check)
        if timers.ping_interval is not None:
            checks.append(self._next_ping)
        if timers.ping_timeout is not None and self._ping_sent_at is not None:
            checks.append(self._ping_sent_at + timers.ping_timeout)
        if not checks or self._done or self._closing:
            return
        when = min(checks)
        if self._timer is not None:
            if self._timer.when() <= when:
                return  # it fires first, and arms the next one
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._done or self._closing:
            return
        timers = self._timers
        now = self._loop.time()
        late = now + _SLACK  # compared with deadlines
        idle = timers.idle_timeout
        if idle is not None and late >= self._next_idle_check:
            client, upstream = self._client.frames, self._upstream.frames
            if client.data_seen or upstream.data_seen:
                client.data_seen = upstream.data_seen = False
                self._quiet_since = now
            elif late >= self._quiet_since + idle:
                log.info("closing a WebSocket with no data frame for %g s", idle)
                self.going_away(b"idle timeout")
                return
            # idle for at least `idle`, and at most a check period more, when it is closed
            self._next_idle_check = min(now + idle / IDLE_CHECKS, self._quiet_since + idle)
        sent, answer_within = self._ping_sent_at, timers.ping_timeout
        if answer_within is not None and sent is not None and late >= sent + answer_within:
            log.info("closing a WebSocket whose client left a ping unanswered %g s", answer_within)
            self.going_away(b"ping timeout")
            return
        if timers.ping_interval is not None and late >= self._next_ping:
            self._next_ping = now + timers.ping_interval
            heard, self._client.frames.heard = self._client.frames.heard, False
            if not heard and (sent is None or answer_within is None):
                self._ping()
        self._arm()

    def _ping(self) -> None:
        """A ping to the client, sent at the next frame boundary toward it; its pong is
        taken out of the stream to the model server (which never pinged)."""
        self._client.frames.expect_pong(KEEPALIVE)
        self._client.queue_ping(control_frame(PING, KEEPALIVE, masked=False))
