"""Strict HTTP/2 peers on both sides of the proxy, from the h2 library (an implementation
independent of the proxy's, that checks every frame it receives): a client and a model
server that play scripted calls and record what arrived on each stream, and every protocol
error h2 found in what the proxy sent them (a window exceeded, a frame on a closed stream,
a malformed header block...).

- `StrictClient.connect(port, window=...)`: calls go out with `call(script)`;
- `StrictUpstream(window=...)`: a model server on 127.0.0.1 that answers each call as the
  `x-call` metadata of its request names in `scripts`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import h2.events
import h2.exceptions
import h2.settings

from .h2peers import Headers, _Peer

SAFETY = 10.0
Chunk = tuple[bytes, int]  # DATA bytes and the padding of the frame that carries them


@dataclass
class Side:
    """What one side of a call sends, in order: headers, DATA chunks, then trailers and the
    end of the stream, or a reset after `reset_after` chunks (None: no reset)."""

    headers: Headers
    chunks: list[Chunk] = field(default_factory=list)
    trailers: Headers | None = None
    reset_after: int | None = None
    reset_code: int = 0x8
    pings: frozenset[int] = frozenset()  # a PING before these chunks

    @property
    def data(self) -> bytes:
        return b"".join(chunk for chunk, _ in self.chunks)


@dataclass
class Seen:
    """What arrived on one stream."""

    headers: Headers | None = None
    data: bytearray = field(default_factory=bytearray)
    trailers: Headers | None = None
    ended: bool = False
    reset_code: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)  # ended or reset
    request_done: asyncio.Event = field(default_factory=asyncio.Event)


class StrictPeer(_Peer):
    """An h2 connection that records the protocol errors it finds, and each stream's frames."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.errors: list[Exception] = []
        self.seen: dict[int, Seen] = {}
        self.pings = self.pongs = 0
        self.ponged = asyncio.Event()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self.errors.append(exc)  # the proxy broke the protocol
                    self.flush()
                    return
                for event in events:
                    self.event(event)
                self.flush()
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            for seen in self.seen.values():
                seen.done.set()
                seen.request_done.set()

    def event(self, event: h2.events.Event) -> None:
        super().event(event)  # acknowledges DATA at once (auto_ack)
        if isinstance(event, h2.events.PingAckReceived):
            self.pongs += 1
            self.ponged.set()
        seen = self.seen.get(getattr(event, "stream_id", 0) or 0)
        if seen is None:
            return
        if isinstance(event, h2.events.ResponseReceived | h2.events.RequestReceived):
            seen.headers = list(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            seen.data += event.data
        elif isinstance(event, h2.events.TrailersReceived):
            seen.trailers = list(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            seen.ended = True
            seen.done.set()
        elif isinstance(event, h2.events.StreamReset):
            seen.reset_code = int(event.error_code)
            seen.done.set()

    async def all_ponged(self) -> None:
        """Every PING sent is answered (a PING sent after its call's answer is answered after
        the call ended)."""
        while self.pongs < self.pings:
            self.ponged.clear()
            await self.ponged.wait()

    def window(self, stream_id: int) -> int:
        try:
            return min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
        except h2.exceptions.StreamClosedError:
            return -1

    async def play(self, stream_id: int, side: Side, after_chunks: asyncio.Event | None) -> None:
        """Send `side` on the stream (its headers are out already), as the windows allow;
        stops where the stream closes under it (the other side reset it)."""
        seen = self.seen[stream_id]
        for index, (chunk, pad) in enumerate(side.chunks):
            if index == side.reset_after:
                return self._reset(stream_id, side.reset_code)
            if index in side.pings:
                self.conn.ping(b"%08d" % index)
                self.pings += 1
            view = memoryview(chunk)
            while view:
                room = self.window(stream_id)
                if room < 0 or seen.reset_code is not None:
                    return
                size = min(len(view), room - (pad + 1 if pad else 0))
                if size <= 0:
                    await self._window_wait(seen)
                    continue
                self.conn.send_data(stream_id, bytes(view[:size]), pad_length=pad or None)
                view = view[size:]
                self.flush()
                await self.writer.drain()
        if side.reset_after is not None and side.reset_after >= len(side.chunks):
            return self._reset(stream_id, side.reset_code)
        if after_chunks is not None:
            async with asyncio.timeout(SAFETY):
                await after_chunks.wait()  # the model server: trailers after the request
        if seen.reset_code is not None or self.window(stream_id) < 0:
            return
        if side.trailers is not None:
            self.conn.send_headers(stream_id, side.trailers, end_stream=True)
        else:
            self.conn.end_stream(stream_id)
        self.flush()

    async def _window_wait(self, seen: Seen) -> None:
        self.window_opened.clear()
        waiting = asyncio.ensure_future(self.window_opened.wait())
        gone = asyncio.ensure_future(seen.done.wait())
        try:
            async with asyncio.timeout(SAFETY):
                await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            gone.cancel()

    def _reset(self, stream_id: int, code: int) -> None:
        with suppress(h2.exceptions.StreamClosedError):
            self.conn.reset_stream(stream_id, code)
            self.flush()
        seen = self.seen[stream_id]
        if seen.reset_code is None:
            seen.reset_code = code  # reset from here
        seen.done.set()


class StrictClient(StrictPeer):
    """A client whose calls are scripts."""

    @classmethod
    async def connect(cls, port: int, *, window: int | None = None) -> StrictClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, client_side=True, auto_ack=True, window=window)

    async def call(self, side: Side) -> Seen:
        """Send the request; what came back once the stream ended or was reset."""
        stream_id = self.conn.get_next_available_stream_id()
        seen = self.seen[stream_id] = Seen()
        self.conn.send_headers(stream_id, side.headers)
        self.flush()
        await self.play(stream_id, side, None)
        async with asyncio.timeout(SAFETY):
            await seen.done.wait()
        return seen

    def settings(self, changes: dict[int, int]) -> None:
        self.conn.update_settings(changes)
        self.flush()


class _UpstreamConnection(StrictPeer):
    def __init__(self, upstream: StrictUpstream, *args: object, **kwargs: object) -> None:
        self.upstream = upstream
        self.tasks: set[asyncio.Task[None]] = set()
        super().__init__(*args, **kwargs)

    def event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            seen = self.seen[event.stream_id] = Seen()
            self.upstream.calls[dict(event.headers).get(b"x-call", b"")] = seen
            task = asyncio.ensure_future(self._answer(event.stream_id, seen))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        super().event(event)
        seen = self.seen.get(getattr(event, "stream_id", 0) or 0)
        if seen is not None and isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
            seen.request_done.set()

    async def _answer(self, stream_id: int, seen: Seen) -> None:
        await asyncio.sleep(0)  # ok: one turn, so the RequestReceived is recorded first
        side = self.upstream.scripts.get(dict(seen.headers or []).get(b"x-call", b""))
        if side is None or seen.reset_code is not None:
            return
        try:
            self.conn.send_headers(stream_id, side.headers)
            self.flush()
            await self.play(stream_id, side, seen.request_done)
        except h2.exceptions.StreamClosedError:
            pass  # the proxy reset the stream meanwhile


class StrictUpstream:
    """A model server on 127.0.0.1:`port` that plays `scripts[x-call]` for each request."""

    def __init__(self, *, window: int | None = None) -> None:
        self.window = window
        self.scripts: dict[bytes, Side] = {}
        self.calls: dict[bytes, Seen] = {}  # what arrived, by x-call
        self.connections: list[_UpstreamConnection] = []
        self.port = 0

    @property
    def errors(self) -> list[Exception]:
        return [error for connection in self.connections for error in connection.errors]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(
            _UpstreamConnection(
                self, reader, writer, client_side=False, auto_ack=True, window=self.window
            )
        )

    def settings(self, changes: dict[int, int]) -> None:
        for connection in self.connections:
            connection.conn.update_settings(changes)
            connection.flush()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[StrictUpstream]:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for connection in self.connections:
                for task in list(connection.tasks):
                    task.cancel()
                await connection.close()
            await server.wait_closed()


SETTING_CODES = h2.settings.SettingCodes
