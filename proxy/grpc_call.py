"""One gRPC call through the proxy: admitted, opened as a stream to the model server's gRPC
port, its messages passed both ways as they come, and its refusals as gRPC statuses."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import monotonic
from typing import Protocol

from . import grpc_status
from .errors import ProxyError, RequestTimeout, UpstreamTimeout, UpstreamUnavailable
from .grpc_upstream import GrpcUpstream, UpstreamConnection
from .h2frames import INTERNAL_ERROR, PROTOCOL_ERROR, Headers
from .h2server import H2Request, H2ServerConnection
from .metrics import disconnect_phase

CLIENT_TO_UPSTREAM, UPSTREAM_TO_CLIENT = "client_to_upstream", "upstream_to_client"


class Admission(Protocol):
    """The concurrency limiter, as a call sees it."""

    def try_acquire(self) -> bool: ...
    async def acquire(self) -> None: ...  # raises QueueFull / QueueTimeout
    def release(self) -> None: ...


class MessageCounter:
    """Counts length-prefixed gRPC messages in a byte stream cut anywhere, reading only their
    5-byte prefixes (the payloads are skipped, never copied)."""

    __slots__ = ("_left", "_prefix")

    def __init__(self) -> None:
        self._prefix = b""  # a prefix split between two chunks
        self._left = 0  # payload bytes of the current message still to come

    def feed(self, data: bytes) -> int:
        """How many messages ended in `data`."""
        count = 0
        pos, size = 0, len(data)
        if self._left or self._prefix:
            pos = self._finish_partial(data)
            if self._left or self._prefix:
                return 0
            count = 1
        # whole prefixes in this chunk: hop from one to the next
        while size - pos >= 5:
            pos += 5 + int.from_bytes(data[pos + 1 : pos + 5], "big")
            if pos > size:
                self._left = pos - size  # the message goes on in the next chunk
                return count
            count += 1
        if pos < size:
            self._prefix = data[pos:]  # a prefix cut short
        return count

    def _finish_partial(self, data: bytes) -> int:
        """Go on with a message begun in an earlier chunk; the position after it (or the
        end of `data`, with the message still unfinished)."""
        if self._prefix:
            need = 5 - len(self._prefix)
            self._prefix += data[:need]
            if len(self._prefix) < 5:
                return len(data)
            self._left = int.from_bytes(self._prefix[1:], "big")
            self._prefix = b""
            pos = need
        else:
            pos = 0
        step = min(self._left, len(data) - pos)
        self._left -= step
        return pos + step

    @property
    def between_messages(self) -> bool:
        return not self._left and not self._prefix


class GrpcCall:
    """Bridges a client stream and a model-server stream; both windows are acknowledged only
    as the other side takes the bytes."""

    __slots__ = (
        "_admission",
        "_admitted",
        "_awaiting",
        "_counted",
        "_early",
        "_length_left",
        "_on_finish",
        "_on_messages",
        "_request_counter",
        "_request_ended",
        "_request_timeout",
        "_request_trailers",
        "_response_counter",
        "_task",
        "_timer",
        "_upstream",
        "admitted_at",
        "arrived_at",
        "client",
        "code",
        "disconnect",
        "done",
        "error_kind",
        "first_byte_at",
        "request",
        "status",
        "stream_id",
        "upstream",
        "upstream_stream",
    )

    def __init__(
        self,
        client: H2ServerConnection,
        request: H2Request,
        *,
        upstream: GrpcUpstream | None,
        admission: Admission,
        request_timeout: float | None,
        on_finish: Callable[[GrpcCall], None],
        on_messages: Callable[[str, int], None],
    ) -> None:
        self.client = client
        self.request = request
        self.stream_id = request.stream_id
        self._upstream = upstream
        self._admission = admission
        self._request_timeout = request_timeout
        self._on_finish = on_finish
        self._on_messages = on_messages
        self.arrived_at = monotonic()
        self.admitted_at: float | None = None
        self.first_byte_at: float | None = None
        self.code = 200  # the HTTP status: 200 for every answered call, 499 if the client left
        self.status: int | None = None  # the gRPC status
        self.error_kind: str | None = None  # the proxy's own refusal, if it was one
        self.disconnect: str | None = None  # the phase in which the client left, if it did
        self.done = False
        self.upstream: UpstreamConnection | None = None
        self.upstream_stream = 0
        self._early: list[bytes] = []  # request bytes before the model server's stream opens
        # what the request's content-length (rarely sent) still allows: a body that breaks
        # it is malformed (RFC 9113 §8.1.1) and is stopped before its excess or its end
        # reaches the model server, which could take it for an error of the whole connection
        self._length_left = request.content_length
        self._request_ended = False
        self._request_trailers: Headers | None = None
        self._admitted = False
        self._counted = False
        self._request_counter = MessageCounter()
        self._response_counter = MessageCounter()
        self._task: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._awaiting = False  # the first message, under the connection's body timeout
        client.set_on_sent(self.stream_id, self._response_sent)

    def start(self) -> None:
        # until the client's first message is whole (or the model server answers), a pause
        # between its frames over the body timeout ends the call: a client that sends slowly
        # on purpose holds its slot no longer than an HTTP/1.1 body could. After it, quiet
        # clients are the protocol (a bidirectional call waits on the model server).
        self._awaiting = True
        self.client.awaiting_request(self.stream_id, 0, True)
        if self._admission.try_acquire():
            self._admitted_now()
        else:
            self._task = asyncio.ensure_future(self._wait_for_slot())

    def refuse(self, code: int, message: str, error_kind: str | None = None) -> None:
        """Answer trailers-only with `code`, before anything reached the model server."""
        if self.done:
            return
        self.first_byte_at = monotonic()
        self.error_kind = error_kind
        self.client.send_headers(
            self.stream_id, grpc_status.trailers_only(code, message), end_stream=True
        )
        self._finish(code)

    def fail(self, error: ProxyError) -> None:
        if self.done:
            return
        if self.first_byte_at is None:
            self.refuse(grpc_status.FOR_ERROR.get(error.kind, grpc_status.INTERNAL), error.message,
                        error.kind)  # fmt: skip
        else:
            self._cut(grpc_status.UNAVAILABLE, error.message)

    # -- the client's stream ----------------------------------------------------------

    def request_data(self, data: bytes) -> None:
        if self.done:
            self.client.ack(self.stream_id, len(data))
            return
        if self._length_left is not None:
            self._length_left -= len(data)
            if self._length_left < 0:
                return self._malformed()
        count = self._request_counter.feed(data)
        if count:
            self._on_messages(CLIENT_TO_UPSTREAM, count)
        if self._awaiting:
            if count:
                self._stop_awaiting()
            else:
                self.client.awaiting_request(self.stream_id, len(data), True)
        if self.upstream is not None:
            self.upstream.send_data(self.upstream_stream, data)
        else:
            self._early.append(data)  # not acknowledged: the client's window bounds it

    def request_trailers(self, headers: Headers) -> None:
        self._request_trailers = headers

    def request_end(self) -> None:
        if self.done:
            return
        if self._length_left:
            return self._malformed()
        self._request_ended = True
        self._stop_awaiting()
        if self.upstream is not None:
            self.upstream.end_stream(self.upstream_stream, self._request_trailers)

    def client_reset(self) -> None:
        """The client cancelled (RST_STREAM) or left: cancel at the model server at once."""
        if not self.done:
            self.code = 499
            answered = self.first_byte_at is not None
            self.disconnect = disconnect_phase(admitted=self._admitted, answered=answered)
            self._finish(grpc_status.CANCELLED)

    def _response_sent(self, size: int) -> None:
        if self.upstream is not None:
            self.upstream.ack(self.upstream_stream, size)

    # -- the model server's stream ----------------------------------------------------

    def response_headers(self, headers: Headers, end: bool) -> None:
        if self.done:
            return
        self._cancel_timer()
        self._stop_awaiting()  # the model server answers: the call is under way
        self.first_byte_at = monotonic()
        self.client.send_headers(self.stream_id, headers, end_stream=end)
        if end:  # trailers-only
            self._finish(grpc_status.status_of(headers))

    def response_data(self, data: bytes) -> None:
        if self.done:
            return
        count = self._response_counter.feed(data)
        if count:
            self._on_messages(UPSTREAM_TO_CLIENT, count)
        self.client.send_data(self.stream_id, data)

    def response_trailers(self, headers: Headers) -> None:
        if self.done:
            return
        self.client.end_stream(self.stream_id, headers)
        self._finish(grpc_status.status_of(headers))

    def response_end(self) -> None:
        if self.done:
            return
        self.client.end_stream(self.stream_id)  # no trailers: the client reads its own error
        self._finish(None)

    def upstream_reset(self, code: int | None) -> None:
        if self.done:
            return
        if code is None:  # the connection went away
            error = UpstreamUnavailable("the model server closed the connection")
            return self.fail(error)
        self.client.reset_stream(self.stream_id, code)
        self._finish(grpc_status.FOR_RESET.get(code, grpc_status.INTERNAL))

    def request_sent(self, size: int) -> None:
        self.client.ack(self.stream_id, size)

    # -- internals --------------------------------------------------------------------

    async def _wait_for_slot(self) -> None:
        try:
            await self._admission.acquire()
        except ProxyError as error:
            self._task = None
            return self.fail(error)
        if self.done:  # cancelled just as the slot came
            self._admission.release()
            return
        self._task = None
        self._admitted_now()

    def _admitted_now(self) -> None:
        self._admitted = True
        self.admitted_at = monotonic()
        assert self._upstream is not None  # a call without one is refused, never started
        connection = self._upstream.take()
        if connection is not None:
            self._open(connection)
        else:
            self._task = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        assert self._upstream is not None
        try:
            connection = await self._upstream.connect()
        except ProxyError as error:
            self._task = None
            return self.fail(error)
        self._task = None
        if not self.done:
            self._open(connection)

    def _open(self, connection: UpstreamConnection) -> None:
        """The stream to the model server: the client's headers as they came, `:path`,
        metadata, `te` and `grpc-timeout` included; then what the client sent so far."""
        self.upstream = connection
        self.upstream_stream = connection.open_call(self.request.headers, self)
        early, self._early = self._early, []
        for chunk in early:
            connection.send_data(self.upstream_stream, chunk)
        if self._request_ended:
            connection.end_stream(self.upstream_stream, self._request_trailers)
        if self._request_timeout is not None:
            self._timer = self.client.loop.call_later(self._request_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self.first_byte_at is None:
            self.fail(UpstreamTimeout())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_stalled(self) -> None:
        """The first message stopped coming for the body timeout."""
        self._awaiting = False
        self.fail(RequestTimeout("timed out reading the request: its first message stopped"))

    def _stop_awaiting(self) -> None:
        if self._awaiting:
            self._awaiting = False
            self.client.awaiting_request(self.stream_id, 0, False)

    def _cut(self, code: int, message: str) -> None:
        """The response started: end it with `code` if it stands between two messages (the
        client reads a clean status), else reset it."""
        if self._response_counter.between_messages:
            self.client.end_stream(self.stream_id, grpc_status.trailers_only(code, message)[2:])
        else:
            self.client.reset_stream(self.stream_id, INTERNAL_ERROR)
            code = grpc_status.INTERNAL
        self._finish(code)

    def _malformed(self) -> None:
        """The client broke the protocol: its stream is reset, the model server's cancelled."""
        self.client.reset_stream(self.stream_id, PROTOCOL_ERROR)
        self._finish(grpc_status.INTERNAL)

    def _finish(self, status: int | None) -> None:
        self.done = True
        self.status = status
        self._cancel_timer()
        self._stop_awaiting()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.upstream is not None:
            # still open at the model server (the client left, or the proxy gave up): it
            # sees RST_STREAM(CANCEL) now, as a client's own cancel would show
            self.upstream.close_stream(self.upstream_stream)
        if self._admitted:
            self._admitted = False
            self._admission.release()
        self._on_finish(self)
