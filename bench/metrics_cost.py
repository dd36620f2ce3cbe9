"""The cost of metrics on the hot path: requests/s through the in-process proxy with its
metrics as they are (A) and with `Metrics.request_finished` replaced by a no-op (B),
measured interleaved (A B A B ...) so that drift in the machine hits both alike.

    python -m bench.metrics_cost [--requests 4000] [--concurrency 32] [--rounds 3]

The model server is a minimal HTTP/1.1 responder in its own process; the proxy and the
aiohttp client share this process's uvloop, as in the test suite. The client costs more
per request than the proxy, so the end-to-end ratio sits within the run-to-run noise; the
cost of one `request_finished` call is also timed directly and printed last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
import yaml

from proxy.app import Proxy
from proxy.config import load_config

# A model server that answers every request at once, so that it is never what waits.
UPSTREAM = r"""
import asyncio, sys, uvloop

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
    b'{"ok":true}'
)

class Responder(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        requests = self.buffer.count(b"\r\n\r\n")  # GETs without a body
        if requests:
            self.buffer = self.buffer[self.buffer.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(RESPONSE * requests)

async def main():
    server = await asyncio.get_running_loop().create_server(Responder, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

uvloop.run(main())
"""


def start_upstream() -> tuple[subprocess.Popen[str], int]:
    process = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def make_proxy(directory: Path, upstream_port: int) -> Proxy:
    config = {
        "docker_server": {
            "start_command": "true",
            "server_port": upstream_port,
            "predict_endpoint": "/predict",
        },
        "runtime": {"predict_concurrency": 1024},
        "proxy": {"host": "127.0.0.1", "port": 1, "secrets_dir": str(directory)},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proxy = Proxy(load_config(path))
    proxy.state.enter("ready", os.getpid())
    return proxy


async def sequential(session: aiohttp.ClientSession, url: str, count: int) -> None:
    for _ in range(count):
        async with session.get(url) as response:
            await response.read()
            assert response.status == 200, response.status


async def run_round(url: str, requests: int, concurrency: int) -> float:
    """requests/s for `requests` sequential requests, then as many on `concurrency`
    connections at once."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await sequential(session, url, 50)  # warm connections and the pool
        started = time.perf_counter()
        await sequential(session, url, requests)
        share = requests // concurrency
        await asyncio.gather(*(sequential(session, url, share) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return (requests + share * concurrency) / elapsed


async def measure(requests: int, concurrency: int, rounds: int) -> None:
    upstream, upstream_port = start_upstream()
    try:
        with tempfile.TemporaryDirectory() as directory:
            proxy = make_proxy(Path(directory), upstream_port)
            loop = asyncio.get_running_loop()
            server = await loop.create_server(proxy.connection, "127.0.0.1", 0)
            url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/sync/ok"
            real: Callable[..., None] = proxy.metrics.request_finished

            def no_op(*args: Any, **kwargs: Any) -> None:
                pass

            results: dict[str, list[float]] = {"A with metrics": [], "B without": []}
            for round_number in range(1, rounds + 1):
                for label, recorder in (("A with metrics", real), ("B without", no_op)):
                    proxy.metrics.request_finished = recorder  # type: ignore[method-assign]
                    rate = await run_round(url, requests, concurrency)
                    results[label].append(rate)
                    print(f"round {round_number} {label:15} {rate:9.0f} requests/s", flush=True)
            proxy.metrics.request_finished = real  # type: ignore[method-assign]
            counted = sum(proxy.metrics.requests.values())
            server.close()
            for connection in list(proxy.connections):
                connection.abort()
            proxy.pool.close()
            await server.wait_closed()
    finally:
        upstream.kill()
        upstream.wait()
    with_metrics = statistics.median(results["A with metrics"])
    without = statistics.median(results["B without"])
    per_call = cost_per_call(proxy)
    print(f"median with metrics:    {with_metrics:9.0f} requests/s")
    print(f"median without metrics: {without:9.0f} requests/s")
    print(f"ratio with/without:     {with_metrics / without:9.3f}")
    print(f"(requests counted by the metrics during the A rounds: {counted})")
    print(
        f"request_finished alone: {per_call * 1e6:.2f} us a call, "
        f"{per_call * with_metrics * 100:.2f}% of a request's time at the rate above"
    )


def cost_per_call(proxy: Proxy, calls: int = 200_000) -> float:
    """Seconds per `request_finished` call, timed directly (the end-to-end ratio above is
    within the noise of a shared machine; this is the cost that ratio hides)."""
    finished = proxy.metrics.request_finished
    started = time.perf_counter()
    for i in range(calls):
        finished(
            "predict",
            "POST",
            200,
            duration=0.003 * (i % 7),
            time_to_first_byte=0.002,
            queue_wait=0.0001,
            rejected=None,
        )
    return (time.perf_counter() - started) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000, help="per phase and round")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="A/B pairs")
    args = parser.parse_args(argv)
    uvloop.run(measure(args.requests, args.concurrency, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
