"""The scenarios: what load, on which backend, and what its figures mean."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .backends import DOWNLOAD_PATH, TRANSFER_BYTES
from .loadgen import client, wrk
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

    def run(self, target: Target, duration: float, workdir: Path) -> Measurement:
        port = target.port(self.backend)
        path = target.path(self.path)
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


def _stream(events: int) -> str:
    return f"/stream?n={events}&interval={SSE_INTERVAL:g}"


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
)  # fmt: skip

BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
