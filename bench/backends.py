"""The backends the proxies forward to: a fast static one (nginx), so that the proxy is
the bottleneck, and a Python model-like one (bench/model_server.py), as users run."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from . import nginx
from .procs import Service, free_port, wait_for_port

TRANSFER_BYTES = 10 * 1024 * 1024
DOWNLOAD_PATH = "/files/10MiB.bin"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Backends:
    """Both backends, by name ("static", "python"), with their ports."""

    static: nginx.Nginx
    python: Service
    ports: dict[str, int]

    def stop(self) -> None:
        self.python.stop()
        self.static.stop()

    def pids(self, name: str) -> list[int]:
        return self.static.pids() if name == "static" else [self.python.pid]


def python_backend_argv(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bench.model_server", "--port", str(port), *extra]


def pick_ports() -> dict[str, int]:
    """The backends' ports, chosen before they start (model-proxy must start first)."""
    return {"static": free_port(), "python": free_port()}


def start(workdir: Path, ports: dict[str, int] | None = None) -> Backends:
    ports = ports or pick_ports()
    root = workdir.parent / "static"  # the 10 MiB file is made once, for every run
    (root / "files").mkdir(parents=True, exist_ok=True)
    download = root / DOWNLOAD_PATH.lstrip("/")
    if not download.exists() or download.stat().st_size != TRANSFER_BYTES:
        download.write_bytes(bytes(range(256)) * (TRANSFER_BYTES // 256))
    static, static_port = nginx.static_backend(workdir / "nginx-backend", root, ports["static"])
    static.start()

    python_port = ports["python"]

    python = Service.start(
        "python-backend",
        python_backend_argv(python_port),
        log=workdir / "python-backend.log",
        cwd=REPO,
    )
    wait_for_port(python_port, python)
    return Backends(static, python, {"static": static_port, "python": python_port})
