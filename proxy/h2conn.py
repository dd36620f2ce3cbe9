"""One HTTP/2 socket, either role: an h2 state machine fed from the socket, its events read in
one loop by the subclass, and per-stream send queues that wait for the peer's windows.

Flow control is what makes a proxy's memory bounded: bytes received on a stream are only
acknowledged (the window handed back to their sender) once the other side of the proxy has
taken them, so a slow reader slows the writer, and a stream holds at most `STREAM_WINDOW`
bytes here. The connection window is opened wide instead: one stalled stream must not stop
the others that share its connection.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import Frame, GoAwayFrame

Headers = list[tuple[bytes, bytes]]
OnSent = Callable[[int], None]

STREAM_WINDOW = 256 * 1024  # received and not yet passed on, per stream
MAX_WINDOW = 2**31 - 1
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST_SIZE = 65536  # as HTTP/1.1's limit on a whole head
WRITE_HIGH_WATER = 1024 * 1024
WRITE_LOW_WATER = 256 * 1024
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, REFUSED_STREAM, CANCEL = 0x0, 0x1, 0x2, 0x7, 0x8

_STREAM_GONE = (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError, KeyError)


class _Outbound:
    """What waits for the peer's window on one stream; its end, once everything is sent."""

    __slots__ = ("chunks", "end", "on_sent", "trailers")

    def __init__(self, on_sent: OnSent | None) -> None:
        self.chunks: deque[bytes] = deque()
        self.on_sent = on_sent  # told how many bytes went out: the source acknowledges them
        self.end = False  # end the stream once the chunks are out
        self.trailers: Headers | None = None  # ...with these trailers


class GracefulConnection(h2.connection.H2Connection):
    """h2 takes any GOAWAY for the end of the connection both ways; RFC 9113 §6.8 lets the
    streams it does not refuse run to their end, which is what a graceful shutdown of a
    gRPC server (or a client's channel close) relies on. A GOAWAY without error is only
    reported here; whoever reads it opens no new stream."""

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        if frame.error_code != h2.errors.ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class H2Endpoint(asyncio.Protocol):
    """The socket and the h2 state machine; the subclass reads the events (`_event`)."""

    def __init__(self, *, client_side: bool, validate_inbound: bool) -> None:
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,  # header names and values stay bytes, as they came
            validate_inbound_headers=validate_inbound,
            normalize_inbound_headers=False,
            # headers sent on are headers received (validated on their way in, or the
            # proxy's own): checking them again costs a third of h2's time per call
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2: h2.connection.H2Connection = GracefulConnection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._outbound: dict[int, _Outbound] = {}
        self._write_paused = False
        self._flush_due = False
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(MAX_WINDOW - self.h2.inbound_flow_control_window)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()  # the GOAWAY h2 prepared
            self.close()
            return
        for event in events:
            if isinstance(event, h2.events.WindowUpdated):
                self._window_opened(event.stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self._window_opened(0)
            else:
                self._event(event)
        self.flush()

    def eof_received(self) -> bool | None:
        return None  # a half-closed HTTP/2 peer has left: close

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._window_opened(0)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._outbound.clear()

    # -- for the subclass and the streams' owners -------------------------------------

    def _event(self, event: h2.events.Event) -> None:
        raise NotImplementedError

    def track(self, stream_id: int, on_sent: OnSent | None) -> None:
        """Give `stream_id` a send queue; `on_sent(n)` hears of every n bytes sent."""
        self._outbound[stream_id] = _Outbound(on_sent)

    def send_headers(self, stream_id: int, headers: Headers, *, end_stream: bool = False) -> None:
        if self.lost:
            return
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except _STREAM_GONE:
            return
        if end_stream:
            self._ended(stream_id)
        self._dirty()

    def send_data(self, stream_id: int, data: bytes) -> None:
        """Send `data` as the windows allow; the rest waits in the stream's queue."""
        out = self._outbound.get(stream_id)
        if out is None or not data:
            return
        out.chunks.append(data)
        if len(out.chunks) == 1:
            self._send(stream_id, out)
            self._dirty()

    def end_stream(self, stream_id: int, trailers: Headers | None = None) -> None:
        """End the stream (with `trailers`, if any) once its queued data is sent."""
        out = self._outbound.get(stream_id)
        if out is None:
            return
        out.end = True
        out.trailers = trailers
        if not out.chunks:
            self._send(stream_id, out)
            self._dirty()

    def ack(self, stream_id: int, size: int) -> None:
        """`size` bytes received on the stream were taken: the peer may send as many more."""
        if self.lost:
            return
        try:
            self.h2.acknowledge_received_data(size, stream_id)
        except _STREAM_GONE:
            return
        self._dirty()

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        self._outbound.pop(stream_id, None)
        if self.lost:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except (*_STREAM_GONE, h2.exceptions.ProtocolError):
            return  # closed already: nothing to reset
        self._dirty()

    def queued(self, stream_id: int) -> int:
        """Bytes of the stream waiting for the peer's window."""
        out = self._outbound.get(stream_id)
        return 0 if out is None else sum(map(len, out.chunks))

    def send_goaway(self, last_stream_id: int) -> None:
        """GOAWAY without error, written past h2 (which would stop every stream): the peer
        opens no new stream, the open ones go on."""
        self.flush()
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        if self.transport is not None and not self.lost:
            self.transport.write(frame.serialize())

    def _dirty(self) -> None:
        """Frames are waiting in h2: write them once this turn of the loop is over, with
        whatever else the turn adds (a write per frame costs a system call each)."""
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_due = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.lost:
            self.transport.write(data)

    def close(self) -> None:
        """Close once what h2 has prepared (the last trailers, a GOAWAY) is written."""
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _ended(self, stream_id: int) -> None:
        """The proxy's side of the stream is over (its last frame is sent)."""
        self._outbound.pop(stream_id, None)

    # -- internals --------------------------------------------------------------------

    def _window_opened(self, stream_id: int) -> None:
        if stream_id:
            out = self._outbound.get(stream_id)
            if out is not None and (out.chunks or out.end):
                self._send(stream_id, out)
            return
        for sid, out in list(self._outbound.items()):
            if out.chunks or out.end:
                self._send(sid, out)

    def _send(self, stream_id: int, out: _Outbound) -> None:
        """Send what the windows allow, frame by frame; end the stream when all is out."""
        if self._write_paused or self.lost:
            return
        connection = self.h2
        try:
            window = connection.local_flow_control_window(stream_id)
        except _STREAM_GONE:
            self._outbound.pop(stream_id, None)
            return
        frame = connection.max_outbound_frame_size
        chunks = out.chunks
        sent = 0
        while chunks and window > 0:
            chunk = chunks[0]
            size = len(chunk)
            if size > window or size > frame:
                size = min(window, frame)
                connection.send_data(stream_id, chunk[:size])
                chunks[0] = chunk[size:]
            else:
                connection.send_data(stream_id, chunk)
                chunks.popleft()
            window -= size
            sent += size
        if sent and out.on_sent is not None:
            out.on_sent(sent)
        if not chunks and out.end:
            if out.trailers is not None:
                connection.send_headers(stream_id, out.trailers, end_stream=True)
            else:
                connection.end_stream(stream_id)
            self._ended(stream_id)
