"""The scenarios: what load, on which backend, and what its figures mean."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import grpc_server
from .backends import DOWNLOAD_PATH, TRANSFER_BYTES
from .loadgen import client, h2load, wrk
from .loadgen.stats import Measurement
from .targets import Target

SSE_EVENTS = 50
SSE_INTERVAL = 0.02
CLIENT_TIMEOUT_MARGIN = 60.0  # a client still running this long after its duration is hung


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    backend: str  # "static" (nginx) or "python" (bench/model_server.py)
    kind: str  # "post", "upload", "download" (wrk); "sse", "ws" (Python clients)
    path: str  # on the backend; each target maps it to its own route
    concurrency: int
    unit: str  # what `count` counts: "req", "event", "MiB", "echo"
    latency: str  # what p50/p99 are the latency of
    events: int = SSE_EVENTS
    once: bool = False  # SSE: every connection runs one stream, all started together
    quick: bool = False  # part of --quick
    # gRPC (kind "grpc"): the request message, the messages each call answers, the calls
    # each connection keeps in flight, and (once) how many calls in all
    grpc_message: bytes = b""
    grpc_replies: int = 1
    grpc_streams: int = 1
    grpc_calls: int | None = None

    def run(self, target: Target, duration: float, workdir: Path) -> Measurement:
        port = target.port(self.backend)
        path = target.path(self.path)
        if self.kind == "grpc":
            body = workdir / f"{self.name}.grpc"
            if not body.exists():
                body.write_bytes(grpc_server.frame(self.grpc_message))
            return h2load.run(
                port,
                path,
                body,
                connections=self.concurrency,
                streams=self.grpc_streams,
                duration=None if self.grpc_calls else duration,
                calls=self.grpc_calls,
                messages_per_call=self.grpc_replies,
                workdir=workdir,
            )
        if self.kind in ("post", "upload", "download"):
            return wrk.run(
                self.kind,
                port,
                path,
                concurrency=self.concurrency,
                duration=duration,
                workdir=workdir,
                upload_size=TRANSFER_BYTES,
            )
        args = [
            "--port", str(port), "--path", path,
            "--concurrency", str(self.concurrency), "--duration", f"{duration:g}",
        ]  # fmt: skip
        if self.kind == "sse" and self.once:
            args += ["--events", str(self.events), "--once"]
        elif self.kind == "sse":
            stagger = self.events * SSE_INTERVAL / self.concurrency
            args += ["--events", str(self.events), "--stagger", f"{stagger:g}"]
        return client.run(self.kind, args, timeout=duration + CLIENT_TIMEOUT_MARGIN)

    @property
    def warms_up(self) -> bool:
        return not self.once  # a warm-up of 1,000 streams would be a whole run

    def check(self, target: Target) -> None:
        """gRPC: one call through the target must end OK with every message (h2load only
        sees HTTP statuses)."""
        if self.kind != "grpc":
            return
        port, path = target.port(self.backend), target.path(self.path)
        replies = h2load.check_call(port, path, self.grpc_message)
        if replies != self.grpc_replies:
            raise RuntimeError(f"{target.name}: {replies} gRPC messages, not {self.grpc_replies}")


def _stream(events: int) -> str:
    return f"/stream?n={events}&interval={SSE_INTERVAL:g}"


GRPC_UNARY = grpc_server.UNARY_REQUEST
GRPC_STREAM_MESSAGES = 20
GRPC_STREAM = grpc_server.stream_request(GRPC_STREAM_MESSAGES, 64)
# 1,000 calls open at once (10 connections of 100 streams): 5 messages a second apart each,
# 1,000 messages/s in all, well within what the grpcio backend can write
GRPC_OPEN_STREAMS = 1000
GRPC_SLOW_MESSAGES = 5
GRPC_SLOW_STREAM = grpc_server.stream_request(GRPC_SLOW_MESSAGES, 64, interval_ms=1000)


SCENARIOS = (
    Scenario(
        "post-static-c1", "small POST, static backend, c1", "static", "post", "/predict", 1,
        "req", "request", quick=True,
    ),
    Scenario(
        "post-static-c64", "small POST, static backend, c64", "static", "post", "/predict", 64,
        "req", "request", quick=True,
    ),
    Scenario(
        "post-python-c64", "small POST, Python backend, c64", "python", "post", "/predict", 64,
        "req", "request",
    ),
    Scenario(
        "infer-python-c256", "50 ms inference, Python backend, c256", "python", "post",
        "/predict?delay=0.05", 256, "req", "request", quick=True,
    ),
    # short streams at c1: many first chunks to time, which is what this one is for
    Scenario(
        "sse-c1", "SSE 5 events 20 ms apart, c1", "python", "sse", _stream(5), 1,
        "event", "event delay", events=5,
    ),
    Scenario(
        "sse-c32", "SSE 50 events 20 ms apart, c32", "python", "sse", _stream(SSE_EVENTS), 32,
        "event", "event delay",
    ),
    Scenario(
        "sse-1000", "SSE 1,000 streams at once, 50 events 20 ms apart", "python", "sse",
        _stream(SSE_EVENTS), 1000, "event", "event delay", once=True, quick=True,
    ),
    Scenario(
        "upload-10MiB", "10 MiB upload, static backend, c1", "static", "upload", "/upload", 1,
        "MiB", "transfer", quick=True,
    ),
    Scenario(
        "download-10MiB", "10 MiB download, static backend, c1", "static", "download",
        DOWNLOAD_PATH, 1, "MiB", "transfer", quick=True,
    ),
    Scenario(
        "ws-c16", "WebSocket echo, Python backend, c16", "python", "ws", "/ws", 16, "echo",
        "echo", quick=True,
    ),
    Scenario(
        "grpc-unary-c64", "gRPC unary calls, grpcio backend, c64", "grpc", "grpc",
        grpc_server.UNARY, 64, "call", "call", grpc_message=GRPC_UNARY, quick=True,
    ),
    Scenario(
        "grpc-unary-c32", "gRPC unary calls, grpcio backend, c32", "grpc", "grpc",
        grpc_server.UNARY, 32, "call", "call", grpc_message=GRPC_UNARY,
    ),
    Scenario(
        "grpc-stream-c64", "gRPC server streams of 20 messages, c64", "grpc", "grpc",
        grpc_server.STREAM, 64, "msg", "call", grpc_message=GRPC_STREAM,
        grpc_replies=GRPC_STREAM_MESSAGES, quick=True,
    ),
    Scenario(
        "grpc-stream-c32", "gRPC server streams of 20 messages, c32", "grpc", "grpc",
        grpc_server.STREAM, 32, "msg", "call", grpc_message=GRPC_STREAM,
        grpc_replies=GRPC_STREAM_MESSAGES,
    ),
    Scenario(
        "grpc-streams-1000", "gRPC: 1,000 server streams open at once (5 msgs 1 s apart)",
        "grpc", "grpc", grpc_server.STREAM, 10, "msg", "call", once=True, quick=True,
        grpc_message=GRPC_SLOW_STREAM, grpc_replies=GRPC_SLOW_MESSAGES, grpc_streams=100,
        grpc_calls=GRPC_OPEN_STREAMS,
    ),
)  # fmt: skip

BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
