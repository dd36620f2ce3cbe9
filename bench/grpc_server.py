"""The gRPC backend: a grpcio (asyncio) server as gRPC model servers are, on raw bytes so
that no protobuf work is measured: a unary echo, and a server stream whose request says how
many messages, how large, and how far apart (`python -m bench.grpc_server --port N`)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
from grpc import aio

SERVICE = "bench.Model"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
REPLY = b'{"outputs": [1, 2, 3], "model": "grpc"}'
UNARY_REQUEST = b'{"inputs": [1, 2, 3]}'


def frame(message: bytes) -> bytes:
    """A length-prefixed gRPC message: what the load generator sends as a request body."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def stream_request(count: int, size: int, interval_ms: int = 0) -> bytes:
    return f"{count}:{size}:{interval_ms}".encode()


async def unary(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
    return REPLY


async def stream(
    request: bytes, context: aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    count, size, interval_ms = (int(part) for part in request.decode().split(":"))
    message = b"t" * size
    for _ in range(count):
        if interval_ms:
            await asyncio.sleep(interval_ms / 1000)
        yield message


async def serve(port: int) -> None:
    server = aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream),
                },
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"grpc backend listening on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
