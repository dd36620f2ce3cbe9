"""WebSocket echo: each connection sends a small text message and waits for it to come
back, over and over; the figure is echoes per second."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import cast

from .stats import Measurement, ms

HANDSHAKE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def masked_text_frame(payload: bytes) -> bytes:
    """A final text frame as a client must send it (masked); payload under 126 bytes."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


class Echoer(asyncio.Protocol):
    """After the 101, counts the bytes of unmasked frames coming back; an echo of our
    frame is `2 + len(payload)` bytes (a server's short text frame)."""

    def __init__(self, frame: bytes, reply_size: int) -> None:
        self.frame = frame
        self.reply_size = reply_size
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self._wake(ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace")))
                return
            self.upgraded = True
            self.buffer = rest
            self._wake(None)
        elif len(self.buffer) >= self.reply_size:
            self.buffer = self.buffer[self.reply_size :]
            self._wake(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._wake(ConnectionError("connection lost"))

    def _wake(self, error: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            if error is None:
                self.waiter.set_result(None)
            else:
                self.waiter.set_exception(error)

    async def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        await self.waiter


async def run(
    host: str, port: int, path: str, *, concurrency: int, duration: float, size: int
) -> Measurement:
    payload = b"x" * size
    frame = masked_text_frame(payload)
    loop = asyncio.get_running_loop()
    echoers: list[Echoer] = []
    for _ in range(concurrency):
        _, echoer = await loop.create_connection(lambda: Echoer(frame, 2 + size), host, port)
        key = base64.b64encode(os.urandom(16)).decode()
        await echoer.send(HANDSHAKE.format(path=path, key=key).encode())
        echoers.append(echoer)
    times: list[float] = []
    errors = 0
    started = time.monotonic()
    deadline = started + duration

    async def worker(echoer: Echoer) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            begun = time.monotonic()
            try:
                await echoer.send(echoer.frame)
            except ConnectionError:
                errors += 1
                return
            times.append(time.monotonic() - begun)

    await asyncio.gather(*(worker(e) for e in echoers))
    elapsed = time.monotonic() - started
    for echoer in echoers:
        if echoer.transport is not None:
            echoer.transport.close()
    return Measurement(
        count=len(times), elapsed=elapsed, p50_ms=ms(times, 50), p99_ms=ms(times, 99), errors=errors
    )
