"""Responses the proxy writes itself: its own endpoints and its errors, rendered when their
turn comes on the connection (never before: a pipelined burst must not pile them up)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

from .errors import ProxyError
from .framing import Headers, RequestHead

if TYPE_CHECKING:
    from .protocol import ClientConnection

log = logging.getLogger("model_proxy")

REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
Answer = tuple[int, Headers, bytes]  # status, headers, body


def render_response(
    status: int, headers: Headers, body: bytes, *, close: bool, head_only: bool = False
) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Unknown"))]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"Content-Length: %d" % len(body))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else body)


def error_headers(error: ProxyError) -> Headers:
    headers: Headers = [(b"Content-Type", b"application/json"), *error.headers]
    if error.retry_after is not None:
        headers.append((b"Retry-After", b"%d" % error.retry_after))
    return headers


class LocalExchange:
    """One request the proxy answers itself; `answer()` runs when its turn comes."""

    __slots__ = ("_answer", "_close", "_conn", "_head_only", "_request_done", "_written")

    def __init__(
        self,
        conn: ClientConnection,
        head: RequestHead,
        answer: Callable[[], Answer],
        *,
        close: bool = False,
    ) -> None:
        self._conn = conn
        self._answer = answer
        # a WebSocket handshake refused here leaves bytes behind it that are no HTTP
        self._close = close or not head.keep_alive or head.websocket
        self._head_only = head.method == b"HEAD"
        self._written = False
        self._request_done = False

    @classmethod
    def fixed(
        cls, conn: ClientConnection, head: RequestHead, status: int, headers: Headers, body: bytes
    ) -> LocalExchange:
        return cls(conn, head, lambda: (status, headers, body))

    @classmethod
    def error(
        cls,
        conn: ClientConnection,
        head: RequestHead,
        error: ProxyError,
        *,
        close: bool = False,
        request_id: bytes | None = None,
    ) -> LocalExchange:
        headers = error_headers(error)
        if request_id is not None:
            headers.append((b"X-Request-ID", request_id))
        body = error.body()
        return cls(conn, head, lambda: (error.status, headers, body), close=close)

    def start(self) -> None:
        self._send(self._answer())

    def _send(self, answer: Answer) -> None:
        status, headers, body = answer
        self._conn.write(
            render_response(status, headers, body, close=self._close, head_only=self._head_only)
        )
        self._written = True
        if self._request_done:
            self._done()

    def request_body(self, chunk: bytes) -> None:
        pass  # nobody reads it

    def request_end(self) -> None:
        self._request_done = True
        if self._written:
            self._done()

    def request_failed(self, error: ProxyError) -> None:
        # its body broke or stalled: the answer stands (written, or to be written in turn),
        # and the connection closes after it
        self._close = True
        self.request_end()

    def flush(self) -> None:
        pass

    def client_lost(self) -> None:
        pass

    def pause_output(self) -> None:
        pass

    def resume_output(self) -> None:
        pass

    def _done(self) -> None:
        self._conn.response_done(self, keep_alive=not self._close, request_done=True)


class DeferredExchange(LocalExchange):
    """A local answer a coroutine makes (/metrics merged with the model server's): awaited
    from its turn on, written when made; a client that leaves cancels it."""

    __slots__ = ("_produce", "_task")

    def __init__(
        self,
        conn: ClientConnection,
        head: RequestHead,
        produce: Callable[[], Awaitable[Answer]],
    ) -> None:
        super().__init__(conn, head, _unused)
        self._produce = produce
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._answer_later())

    async def _answer_later(self) -> None:
        try:
            answer = await self._produce()
        except Exception:
            # a bug, not a state of the model server: the client must not wait forever
            log.exception("cannot make a local answer")
            self._conn.abort()
            return
        self._send(answer)

    def client_lost(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _unused() -> Answer:
    raise AssertionError("a DeferredExchange's answer comes from its coroutine")
