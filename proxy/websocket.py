"""The WebSocket bridge: after the model server's 101, bytes flow both ways untouched
(frames, fragments, pings, close codes, extensions), while frame headers are read on the
way to count messages and to know where a close frame may be slipped in at shutdown."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Callable
from typing import cast

CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"
GOING_AWAY = 1001
CLOSE_LINGER = 2.0  # how long peers may take to answer our close frame


class FrameReader:
    """Follows frame boundaries in one direction of a WebSocket stream."""

    __slots__ = ("_header", "_remaining")

    def __init__(self) -> None:
        self._remaining = 0  # payload bytes of the current frame still to pass
        self._header = b""  # a frame header split across reads

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._header

    def feed(self, data: bytes) -> int:
        """Consume `data`; the number of messages whose last frame ended in it."""
        messages = 0
        position, size = 0, len(data)
        while position < size:
            if self._remaining:
                step = min(self._remaining, size - position)
                self._remaining -= step
                position += step
                continue
            known = len(self._header)
            header = self._header + data[position : position + 14]
            if len(header) < 2:
                self._header = header
                return messages
            length = header[1] & 0x7F
            header_size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
            header_size += 4 if header[1] & 0x80 else 0  # masked
            if len(header) < header_size:
                self._header = header
                return messages
            if length == 126:
                length = struct.unpack_from("!H", header, 2)[0]
            elif length == 127:
                length = struct.unpack_from("!Q", header, 2)[0]
            position += header_size - known
            self._header = b""
            self._remaining = length
            fin, opcode = header[0] & 0x80, header[0] & 0x0F
            if fin and opcode < 8:  # the last frame of a text, binary or continued message
                messages += 1
        return messages


def close_frame(code: int, reason: bytes, *, masked: bool) -> bytes:
    payload = struct.pack("!H", code) + reason[:123]
    if not masked:
        return bytes((0x88, len(payload))) + payload
    mask = os.urandom(4)
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x88, 0x80 | len(payload))) + mask + body


class _Side(asyncio.Protocol):
    """One end of the tunnel: what it reads goes to the other end as it is."""

    def __init__(self, tunnel: Tunnel, direction: str, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.direction = direction
        self.transport = transport
        self.frames = FrameReader()
        self.closed = False
        self.eof = False  # this side's peer will send nothing more
        self.pending_close: bytes | None = None  # a close frame for this side's peer
        self.sent_close = False  # after our close frame the peer gets no more frames
        self.other: _Side

    def data_received(self, data: bytes) -> None:
        messages = self.frames.feed(data)
        if messages:
            self.tunnel.on_messages(self.direction, messages)
        if not self.other.sent_close:
            self.other.transport.write(data)
        if self.frames.at_boundary and self.other.pending_close is not None:
            self.other.send_pending_close_to_peer()

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

    # -- shutdown: a close frame toward this side's peer ----------------------------

    def queue_close(self, frame: bytes) -> None:
        """Send `frame` to this side's peer as soon as no frame toward it is half-sent."""
        self.pending_close = frame
        if self.other.frames.at_boundary:
            self.send_pending_close_to_peer()

    def send_pending_close_to_peer(self) -> None:
        frame, self.pending_close = self.pending_close, None
        if frame is not None and not self.transport.is_closing() and not self.other.eof:
            self.transport.write(frame)
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
    ) -> None:
        self.on_messages = on_messages
        self._on_closed = on_closed
        # from the client's socket to the model server, and back
        self._client = _Side(self, CLIENT_TO_UPSTREAM, cast(asyncio.Transport, client))
        self._upstream = _Side(self, UPSTREAM_TO_CLIENT, cast(asyncio.Transport, upstream))
        self._client.other, self._upstream.other = self._upstream, self._client
        self._done = False
        self._linger: asyncio.TimerHandle | None = None
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

    def going_away(self, reason: bytes = b"proxy shutting down") -> None:
        """Shutdown: close both ends with 1001, then cut the sockets if the peers linger."""
        self._client.queue_close(close_frame(GOING_AWAY, reason, masked=False))
        self._upstream.queue_close(close_frame(GOING_AWAY, reason, masked=True))
        loop = asyncio.get_running_loop()
        self._linger = loop.call_later(CLOSE_LINGER, self.abort)

    def abort(self) -> None:
        self._client.transport.abort()
        self._upstream.transport.abort()

    def side_closed(self) -> None:
        if self._done or not (self._client.closed and self._upstream.closed):
            return
        self._done = True
        if self._linger is not None:
            self._linger.cancel()
        self._on_closed(self)
