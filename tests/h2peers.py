"""Raw HTTP/2 peers on loopback, for what grpcio hides from a test: the frames, the windows,
the exact headers and trailers.

- `H2Client.connect(port)`: a client (prior knowledge) whose streams are read into `Reply`s;
  with `auto_ack=False` it never hands a window back, like a client that stops reading;
- `H2Upstream()`: a model server at the frame level; each request arrives as an
  `UpstreamStream` the test answers by hand (headers, data as its window allows, trailers).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from hyperframe.frame import Frame, GoAwayFrame

Headers = list[tuple[bytes, bytes]]
SAFETY = 10.0  # seconds: only a net for a hang


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message (not compressed)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_request(port: int, path: bytes, *extra: tuple[bytes, bytes]) -> Headers:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"127.0.0.1:%d" % port),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *extra,
    ]


class GracefulConnection(h2.connection.H2Connection):
    """h2 takes any GOAWAY for the end of the connection both ways; RFC 9113 §6.8 lets the
    streams it does not refuse run to their end, and grpcio's clients and servers do so. A
    GOAWAY without error is only reported here."""

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


class Reply:
    """What came back on one stream."""

    def __init__(self) -> None:
        self.headers: Headers | None = None
        self.data = bytearray()
        self.trailers: Headers | None = None
        self.reset_code: int | None = None
        self.header_frames = 0  # HEADERS blocks received (1 for a trailers-only answer)
        self.ended = asyncio.Event()  # END_STREAM or RST_STREAM
        self.got_headers = asyncio.Event()
        self.got_data = asyncio.Event()

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers or []).get(name)

    def trailer(self, name: bytes) -> bytes | None:
        return dict(self.trailers or []).get(name)

    @property
    def status(self) -> int:
        return int(self.header(b":status") or 0)


class _Peer:
    """An h2 connection over asyncio streams, read by a task."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        client_side: bool,
        auto_ack: bool,
        window: int | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.auto_ack = auto_ack
        # streams go on after a GOAWAY without error, as grpcio's do (plain h2 stops them)
        self.conn: h2.connection.H2Connection = GracefulConnection(
            h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        )
        if window is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=client_side,
                initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window},
            )
        self.unacked: dict[int, int] = {}  # bytes received and not acknowledged, by stream
        self.sent: dict[int, int] = {}  # DATA bytes sent, by stream
        self.window_opened = asyncio.Event()
        self.blocked = asyncio.Event()  # send_all waits for a window
        self.resumed = asyncio.Event()  # ...and got one
        self.pong = asyncio.Event()
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.got_goaway = asyncio.Event()
        self.closed = asyncio.Event()
        self.conn.initiate_connection()
        self.flush()
        self._task = asyncio.create_task(self._read())

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                for event in self.conn.receive_data(data):
                    self.event(event)
                self.flush()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed.set()
            self.ended_all()

    def event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                self.unacked[event.stream_id] = (
                    self.unacked.get(event.stream_id, 0) + event.flow_controlled_length
                )
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self.window_opened.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
            self.got_goaway.set()
        elif isinstance(event, h2.events.PingAckReceived):
            self.pong.set()

    def ack(self, stream_id: int) -> None:
        """Hand back the window of everything read so far on the stream."""
        size = self.unacked.pop(stream_id, 0)
        if size:
            self.conn.acknowledge_received_data(size, stream_id)
            self.flush()

    async def ping(self) -> None:
        """A PING answered: every frame the peer sent before its answer has been read."""
        self.pong.clear()
        self.conn.ping(b"roundtrp")
        self.flush()
        async with asyncio.timeout(SAFETY):
            await self.pong.wait()

    async def wait_until_stalled(self, stream_id: int) -> None:
        """Until send_all waits for a window that a PING round trip did not reopen."""
        async with asyncio.timeout(SAFETY):
            while True:
                self.resumed.clear()
                await self.blocked.wait()
                await self.ping()
                if not self.blocked.is_set():
                    continue
                if self.conn.local_flow_control_window(stream_id) <= 0:
                    return
                await self.resumed.wait()  # send_all takes the window it was given

    async def send_all(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """Send `data` as the peer's windows allow (waits for WINDOW_UPDATEs)."""
        view = memoryview(data)
        while view:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                self.window_opened.clear()
                self.blocked.set()
                async with asyncio.timeout(SAFETY):
                    await self.window_opened.wait()
                self.blocked.clear()
                self.resumed.set()
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            self.sent[stream_id] = self.sent.get(stream_id, 0) + len(view[:window])
            view = view[window:]
            self.flush()
            await self.writer.drain()
        if end:
            self.conn.end_stream(stream_id)
            self.flush()

    def ended_all(self) -> None:
        pass

    async def close(self) -> None:
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        with suppress(ConnectionError):
            await self.writer.wait_closed()


class H2Client(_Peer):
    """A raw HTTP/2 client."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.replies: dict[int, Reply] = {}
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    @classmethod
    async def connect(
        cls, port: int, *, auto_ack: bool = True, window: int | None = None
    ) -> H2Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, client_side=True, auto_ack=auto_ack, window=window)

    def request(self, headers: Headers, body: bytes = b"", *, end: bool = True) -> int:
        """Open a stream; `body` goes in one go (it must fit the initial window)."""
        stream_id = self.conn.get_next_available_stream_id()
        self.replies[stream_id] = Reply()
        self.conn.send_headers(stream_id, headers, end_stream=end and not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.flush()
        return stream_id

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, 0x8)  # CANCEL
        self.flush()

    async def reply(self, stream_id: int) -> Reply:
        """The stream's reply once it ended."""
        reply = self.replies[stream_id]
        async with asyncio.timeout(SAFETY):
            await reply.ended.wait()
        return reply

    async def get(self, path: str, *extra: tuple[bytes, bytes], method: bytes = b"GET") -> Reply:
        headers = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"proxy.test"),
            *extra,
        ]
        return await self.reply(self.request(headers))

    def event(self, event: h2.events.Event) -> None:
        super().event(event)
        reply = self.replies.get(getattr(event, "stream_id", 0) or 0)
        if reply is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            reply.headers = list(event.headers)
            reply.header_frames += 1
            reply.got_headers.set()
        elif isinstance(event, h2.events.DataReceived):
            reply.data += event.data
            reply.got_data.set()
        elif isinstance(event, h2.events.TrailersReceived):
            reply.trailers = list(event.headers)
            reply.header_frames += 1
        elif isinstance(event, h2.events.StreamEnded):
            reply.ended.set()
        elif isinstance(event, h2.events.StreamReset):
            reply.reset_code = int(event.error_code)
            reply.ended.set()

    def ended_all(self) -> None:
        for reply in self.replies.values():
            reply.ended.set()


class UpstreamStream:
    """One request as the frame-level model server saw it; the test answers it."""

    def __init__(self, peer: _Peer, stream_id: int, headers: Headers) -> None:
        self.peer = peer
        self.stream_id = stream_id
        self.headers = headers
        self.data = bytearray()
        self.request_trailers: Headers | None = None
        self.ended = asyncio.Event()  # the request's END_STREAM
        self.reset = asyncio.Event()  # RST_STREAM from the proxy
        self.reset_code: int | None = None
        self.got_data = asyncio.Event()

    def respond(self, headers: Headers, *, end: bool = False) -> None:
        self.peer.conn.send_headers(self.stream_id, headers, end_stream=end)
        self.peer.flush()

    async def send(self, data: bytes) -> None:
        await self.peer.send_all(self.stream_id, data)

    def trailers(self, headers: Headers) -> None:
        self.peer.conn.send_headers(self.stream_id, headers, end_stream=True)
        self.peer.flush()

    def ack(self) -> None:
        self.peer.ack(self.stream_id)

    async def wait_for_data(self, size: int) -> None:
        async with asyncio.timeout(SAFETY):
            while len(self.data) < size:
                self.got_data.clear()
                await self.got_data.wait()


class _UpstreamConnection(_Peer):
    def __init__(self, upstream: H2Upstream, *args: object, **kwargs: object) -> None:
        self.upstream = upstream
        self.streams: dict[int, UpstreamStream] = {}
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def event(self, event: h2.events.Event) -> None:
        super().event(event)
        if isinstance(event, h2.events.RequestReceived):
            stream = UpstreamStream(self, event.stream_id, list(event.headers))
            self.streams[event.stream_id] = stream
            self.upstream.arrived.put_nowait(stream)
            return
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if stream is None:
            return
        if isinstance(event, h2.events.DataReceived):
            stream.data += event.data
            stream.got_data.set()
        elif isinstance(event, h2.events.TrailersReceived):
            stream.request_trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            stream.ended.set()
        elif isinstance(event, h2.events.StreamReset):
            stream.reset_code = int(event.error_code)
            stream.reset.set()

    def ended_all(self) -> None:
        for stream in self.streams.values():
            stream.reset.set()


class H2Upstream:
    """A model server at the HTTP/2 frame level, on 127.0.0.1:`port`."""

    def __init__(self, *, auto_ack: bool = True) -> None:
        self.auto_ack = auto_ack
        self.arrived: asyncio.Queue[UpstreamStream] = asyncio.Queue()
        self.connections: list[_UpstreamConnection] = []
        self.port = 0

    async def next_stream(self) -> UpstreamStream:
        async with asyncio.timeout(SAFETY):
            return await self.arrived.get()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(
            _UpstreamConnection(
                self, reader, writer, client_side=False, auto_ack=self.auto_ack, window=None
            )
        )

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[H2Upstream]:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for connection in self.connections:
                await connection.close()
            await server.wait_closed()
