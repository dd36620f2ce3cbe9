"""A grpcio model server in the test's event loop: every call kind on raw bytes (no protobuf
to compile), and what each call saw, for the test to check. Its handlers can wait on events
the test sets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from grpc import aio

SERVICE = "test.Model"
BIG = 64 * 1024 * 1024
# a 20 MB message needs more than grpcio's 4 MiB default, on both ends
OPTIONS = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]


class Model:
    """Unary, server-streaming, client-streaming and bidirectional methods on raw bytes."""

    def __init__(self) -> None:
        self.metadata: list[tuple[str, str | bytes]] = []  # the last call's
        self.time_remaining: float | None = None
        self.cancelled = asyncio.Event()  # a call was cancelled while the handler ran
        self.release = asyncio.Event()  # Hold and Stream wait on it
        self.release.set()
        self.started = asyncio.Event()  # Hold began
        self.received: asyncio.Queue[bytes] = asyncio.Queue()  # messages of Bidi, as they come
        self.sent = 0  # messages Stream has written

    def _seen(self, context: aio.ServicerContext[bytes, bytes]) -> None:
        self.metadata = list(context.invocation_metadata() or [])
        self.time_remaining = context.time_remaining()

    async def unary(self, request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        """Echo reversed, with metadata both ways and a custom status when asked."""
        self._seen(context)
        await context.send_initial_metadata((("x-initial", "yes"), ("x-initial-bin", b"\x00\xff")))
        context.set_trailing_metadata((("x-trailer", "done"), ("x-trailer-bin", b"\x01\x02\x00")))
        if request.startswith(b"fail:"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                request[5:].decode(),
                trailing_metadata=(("grpc-status-details-bin", b"\x08\x03\x12\x04why?"),),
            )
        return request[::-1]

    async def hold(self, request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        """Answers once the test sets `release`; notes a cancel."""
        self._seen(context)
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return request

    async def stream(
        self, request: bytes, context: aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        """`request` is "count:size": that many messages of that size."""
        self._seen(context)
        count, size = (int(part) for part in request.decode().split(":"))
        try:
            for index in range(count):
                await self.release.wait()
                yield index.to_bytes(4, "big") + b"s" * max(size - 4, 0)
                self.sent += 1
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def collect(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        """How many messages and bytes came."""
        self._seen(context)
        count = size = 0
        async for message in requests:
            count += 1
            size += len(message)
        return b"%d:%d" % (count, size)

    async def bidi(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        """Each message back in upper case, at once."""
        self._seen(context)
        try:
            async for message in requests:
                self.received.put_nowait(message)
                yield message.upper()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "Hold": grpc.unary_unary_rpc_method_handler(self.hold),
                "Stream": grpc.unary_stream_rpc_method_handler(self.stream),
                "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )


@asynccontextmanager
async def grpc_model() -> AsyncIterator[tuple[Model, int]]:
    """A `Model` served on 127.0.0.1; yields it and its port."""
    model = Model()
    server = aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers([model.handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield model, port
    finally:
        model.release.set()
        await server.stop(None)


@asynccontextmanager
async def channel(url_or_port: str | int) -> AsyncIterator[aio.Channel]:
    port = url_or_port if isinstance(url_or_port, int) else int(url_or_port.rsplit(":", 1)[1])
    async with aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as chan:
        yield chan


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"
