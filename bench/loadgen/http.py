"""A minimal keep-alive HTTP/1.1 client connection on llhttp (httptools): one request at a
time, the response body handed to a callback piece by piece with the time of the read that
brought it, so the cost on the client side stays small next to what it measures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import cast

import httptools

BodyCallback = Callable[[bytes, float, int], None]  # piece, read time, read number


class HttpError(Exception):
    pass


class Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._done: asyncio.Future[int] | None = None
        self._on_body: BodyCallback | None = None
        self._read_at = 0.0
        self.reads = 0  # data_received calls so far: pieces of one read share a number
        self.lost = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(cls, host, port)
        return connection

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._read_at = time.time()
        self.reads += 1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"bad response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(HttpError(f"connection lost: {exc or 'closed by the server'}"))
        if not self.lost.done():
            self.lost.set_result(None)

    # -- httptools callbacks -------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        if self._on_body is not None:
            self._on_body(body, self._read_at, self.reads)

    def on_message_complete(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(self._parser.get_status_code())

    # -----------------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)

    async def request(
        self, head: bytes, body: bytes = b"", on_body: BodyCallback | None = None
    ) -> int:
        """Send a request (its head and body as given) and wait for the whole response;
        returns its status."""
        if self.transport is None or self.transport.is_closing():
            raise HttpError("connection closed")
        self._done = asyncio.get_running_loop().create_future()
        self._on_body = on_body
        if body:
            self.transport.writelines((head, body))  # no copy of a large body into the head
        else:
            self.transport.write(head)
        return await self._done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def request_head(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
