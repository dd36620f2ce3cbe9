"""A gRPC-only model server for the fault tests: its health service says SERVING for
`--service` (and NOT_SERVING for the whole server, "", so that a probe asking the wrong
name never sees it ready) until it gets SIGUSR1, then NOT_SERVING: a server still alive and
listening, but broken.

    python tests/faults/grpc_child.py --port N --dir CONTROL --service NAME
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def serve(port: int, control: Path, service: str) -> None:
    server = aio.server()
    healthy = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(healthy, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    (control / "server.pid").write_text(str(os.getpid()))  # before SERVING: ready means written
    sick = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, sick.set)
    await healthy.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await healthy.set(service, health_pb2.HealthCheckResponse.SERVING)
    await sick.wait()
    await healthy.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    print("health: NOT_SERVING", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--service", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.dir, args.service))


if __name__ == "__main__":
    main()
