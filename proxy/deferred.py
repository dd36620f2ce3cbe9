"""A response the proxy produces itself but not at once (/metrics merged with the model
server's): a coroutine makes it when the request's turn comes, and it is written then."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .protocol import ClientConnection, Headers, RequestHead, render_response

log = logging.getLogger("model_proxy")

Answer = tuple[int, Headers, bytes]  # status, headers, body


class DeferredExchange:
    """As LocalExchange, but its answer comes from `produce`, awaited from `start()` on;
    a client that leaves cancels it."""

    __slots__ = ("_conn", "_head", "_produce", "_request_done", "_task", "_written")

    def __init__(
        self,
        conn: ClientConnection,
        head: RequestHead,
        produce: Callable[[], Awaitable[Answer]],
    ) -> None:
        self._conn = conn
        self._head = head
        self._produce = produce
        self._task: asyncio.Task[None] | None = None
        self._written = False
        self._request_done = False

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._answer())

    async def _answer(self) -> None:
        try:
            status, headers, body = await self._produce()
        except Exception:
            # a bug, not a state of the model server: the client must not wait forever
            log.exception("cannot answer %s", self._head.target.decode("latin-1"))
            self._conn.abort()
            return
        head = self._head
        close = not head.keep_alive or head.upgrade
        self._conn.write(
            render_response(status, headers, body, close=close, head_only=head.method == b"HEAD")
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

    def flush(self) -> None:
        pass

    def client_lost(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def request_timed_out(self) -> None:
        self.client_lost()  # the connection closes after this

    def pause_output(self) -> None:
        pass

    def resume_output(self) -> None:
        pass

    def _done(self) -> None:
        keep_alive = self._head.keep_alive and not self._head.upgrade
        self._conn.response_done(self, keep_alive=keep_alive, request_done=True)
