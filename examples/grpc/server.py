"""A small gRPC model server (grpcio): one method of each call kind and the standard health
service, as the example behind `runtime.transport.kind: grpc`. See README.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

HERE = Path(__file__).resolve().parent
SERVICE = "model.v1.Model"
MAX_MESSAGE = 64 * 1024 * 1024  # 20 MB uploads pass; grpcio's default is 4 MiB

# compiled from model.proto at start (grpcio-tools), so the example has no generated files;
# protos_and_services looks for it on sys.path
sys.path.insert(0, str(HERE))
model_pb2, model_pb2_grpc = grpc.protos_and_services("model.proto")


class Model(model_pb2_grpc.ModelServicer):
    def __init__(self, factor: float) -> None:
        self.factor = factor

    async def Predict(self, request, context):
        return model_pb2.PredictReply(outputs=[x * self.factor for x in request.inputs])

    async def Generate(self, request, context):
        words = request.prompt.split()
        if request.max_tokens:
            words = words[: request.max_tokens]
        for index, word in enumerate(words):
            if request.interval_ms:
                await asyncio.sleep(request.interval_ms / 1000)
            yield model_pb2.Token(text=word, index=index)

    async def Upload(self, requests, context):
        size = chunks = 0
        async for chunk in requests:
            size += len(chunk.data)
            chunks += 1
        return model_pb2.UploadReply(bytes=size, chunks=chunks)

    async def Chat(self, requests, context):
        async for message in requests:
            yield model_pb2.ChatMessage(text=f"echo: {message.text}")


async def load(weights: Path, stop: asyncio.Event) -> float | None:
    """Wait for the weights file (a model still loading), then read the factor from it."""
    while not stop.is_set():
        if await asyncio.to_thread(weights.is_file):
            return float(json.loads(await asyncio.to_thread(weights.read_text))["factor"])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)
    return None


async def serve(host: str, port: int, factor: float, weights: Path | None) -> None:
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    model = Model(factor)
    model_pb2_grpc.add_ModelServicer_to_server(model, server)
    healthy = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(healthy, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"grpc model server listening on {host}:{bound}", flush=True)

    async def set_status(status: int) -> None:
        for name in ("", SERVICE):  # the whole server, and the model's service
            await healthy.set(name, status)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if weights is not None:
        # loading: the port answers, the health service says NOT_SERVING
        await set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        print(f"loading weights from {weights}", flush=True)
        model.factor = await load(weights, stop) or factor
    await set_status(health_pb2.HealthCheckResponse.SERVING)
    print(f"model loaded (factor {model.factor}): SERVING", flush=True)
    await stop.wait()
    await set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=5)  # calls in flight may finish
    print("grpc model server stopped", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "50051")))
    parser.add_argument("--factor", type=float, default=2.0, help="Predict's multiplier")
    parser.add_argument(
        "--weights",
        type=Path,
        help='a JSON file {"factor": F}: NOT_SERVING until it exists, then Predict uses F',
    )
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.factor, args.weights))


if __name__ == "__main__":
    main()
