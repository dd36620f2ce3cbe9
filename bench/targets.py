"""The targets measured side by side: the backend directly, nginx tuned, nginx as
Baseten's docker_server configures it, and model-proxy. Each knows where to send traffic
for a backend and which processes' CPU and memory are its cost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from . import nginx
from .backends import REPO, Backends
from .procs import Service, free_port, http_status

TARGET_NAMES = ("direct", "nginx-tuned", "nginx-docker", "model-proxy", "model-proxy-compiled")
PROXY_NAMES = ("model-proxy", "model-proxy-compiled")  # the pure build and the mypyc one
REFERENCE = "nginx-tuned"  # every ratio is to this one
READY_TIMEOUT = 30.0


class Target(Protocol):
    name: str

    def port(self, backend: str) -> int: ...

    def path(self, backend_path: str) -> str:
        """The path to ask for to reach `backend_path` on the backend through this target."""
        ...

    def pids(self, backend: str) -> list[int]:
        """The processes whose CPU and memory this target costs (none for direct)."""
        ...

    def stop(self) -> None: ...


def proxied_path(backend_path: str) -> str:
    """model-proxy's routes, which the nginx proxies copy: /predict and gRPC methods
    (/package.Service/Method) as they are, the rest under /sync/."""
    if backend_path == "/predict" or backend_path.startswith(("/predict?", "/bench.")):
        return backend_path
    return "/sync" + backend_path


@dataclass
class Direct:
    backends: Backends
    name: str = "direct"

    def port(self, backend: str) -> int:
        return self.backends.ports[backend]

    def path(self, backend_path: str) -> str:
        return backend_path

    def pids(self, backend: str) -> list[int]:
        return []

    def stop(self) -> None:
        pass


@dataclass
class NginxProxy:
    name: str
    server: nginx.Nginx
    ports: dict[str, int]

    def port(self, backend: str) -> int:
        return self.ports[backend]

    def path(self, backend_path: str) -> str:
        return proxied_path(backend_path)

    def pids(self, backend: str) -> list[int]:
        return self.server.pids()

    def stop(self) -> None:
        self.server.stop()


def model_proxy_config(
    directory: Path,
    *,
    name: str,
    port: int,
    server_port: int,
    start_command: str = "exec sleep infinity",
    readiness_endpoint: str | None = None,
    grpc: bool = False,
) -> Path:
    """A config whose child does nothing by default (the backend runs on its own, and
    readiness is the backend's port accepting TCP; with `grpc` the backend is a gRPC-only
    server, probed with the gRPC health check, which it answers UNIMPLEMENTED: ready)."""
    docker_server: dict[str, object] = {
        "start_command": start_command,
        "server_port": server_port,
        "predict_endpoint": "/predict",
    }
    if readiness_endpoint:
        docker_server["readiness_endpoint"] = readiness_endpoint
    config = {
        "model_name": name,
        "docker_server": docker_server,
        # every scenario's concurrency fits in, up to 1,000 streams at once
        "runtime": {"predict_concurrency": 4096, "transport": {"kind": "grpc" if grpc else "http"}},
        "proxy": {
            "host": "127.0.0.1",
            "port": port,
            "max_queue_size": 4096,
            "drain_quiet_seconds": 0,
            "shutdown_grace_seconds": 2,
            "child_stop_grace_seconds": 1,
            "access_log": False,  # as the nginx configs: access_log off
        },
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_model_proxy(config: Path, name: str, log: Path, source: Path = REPO) -> Service:
    """`python -m proxy` from `source`: the checkout (pure Python) or a compiled copy."""
    return Service.start(
        name, [sys.executable, "-m", "proxy", "run", "--config", str(config)], log=log, cwd=source
    )


def compiled_copy(directory: Path) -> Path:
    """A copy of the checkout with the request path compiled by mypyc beside its sources
    (setup.py, MODEL_PROXY_COMPILE=1), as .ci/compiled makes it."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, target)
    built = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=directory,
        env={**os.environ, "MODEL_PROXY_COMPILE": "1"},
        capture_output=True,
        text=True,
    )
    if built.returncode:
        raise RuntimeError(
            f"the compiled build failed:\n{built.stdout[-2000:]}{built.stderr[-2000:]}"
        )
    return directory


def wait_ready(service: Service, port: int, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.check_alive()
        if http_status(port, "/ready") == 200:
            return
        time.sleep(0.01)
    raise RuntimeError(f"{service.name}: /ready is not 200 after {timeout} s; see {service.log}")


@dataclass
class ModelProxy:
    """One model-proxy process per backend (a config has one server_port).

    model-proxy refuses a server_port that something already listens on (that would not be
    its child). Here the backends are shared with the other targets and are not its
    children, so `launch()` runs before the backends start, and `wait()` once they have."""

    workdir: Path
    backend_ports: dict[str, int]
    name: str = "model-proxy"
    source: Path = REPO  # where `python -m proxy` runs from: the compiled copy, or not
    services: dict[str, Service] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def launch(self) -> None:
        for backend, server_port in self.backend_ports.items():
            port = free_port()
            config = model_proxy_config(
                self.workdir,
                name=f"{self.name}-{backend}",
                port=port,
                server_port=server_port,
                grpc=backend == "grpc",
            )
            log = self.workdir / f"{self.name}-{backend}.log"
            self.services[backend] = start_model_proxy(
                config, f"{self.name} ({backend})", log, self.source
            )
            self.ports[backend] = port
        # its port check is done once it has started its child: then the backends may start
        deadline = time.monotonic() + READY_TIMEOUT
        for service in self.services.values():
            while "started the model server" not in service.log.read_text(errors="replace"):
                service.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{service.name} did not start; see {service.log}")
                time.sleep(0.01)

    def wait(self) -> None:

        for backend, service in self.services.items():
            wait_ready(service, self.ports[backend])

    def port(self, backend: str) -> int:
        return self.ports[backend]

    def path(self, backend_path: str) -> str:
        return proxied_path(backend_path)

    def pids(self, backend: str) -> list[int]:
        # the proxy process only: its child here is `sleep`, the backend runs on its own
        return [self.services[backend].pid]

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()


def start_all(
    workdir: Path,
    backends: Backends,
    names: Sequence[str],
    cleanup: ExitStack,
    model_proxies: dict[str, ModelProxy] | None = None,
) -> list[Target]:
    """Start the named targets; each is stopped by `cleanup`, even one that failed to start.
    model-proxy must have been launched before the backends (`launch_model_proxies`)."""
    targets: list[Target] = []
    for name in names:
        target: Target
        if name == "direct":
            target = Direct(backends)
        elif name in ("nginx-tuned", "nginx-docker"):
            make = nginx.tuned_proxy if name == "nginx-tuned" else nginx.docker_server_proxy
            server, ports = make(workdir / name, backends.ports)
            target = NginxProxy(name, server, ports)
            cleanup.callback(target.stop)
            server.start()
        elif name in PROXY_NAMES:
            if model_proxies is None or name not in model_proxies:
                raise ValueError(f"{name} must be launched before the backends start")
            target = model_proxies[name]
            target.wait()

        else:
            raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGET_NAMES)}")
        targets.append(target)
    return targets


def launch_model_proxies(
    workdir: Path, backend_ports: dict[str, int], names: Sequence[str], cleanup: ExitStack
) -> dict[str, ModelProxy]:
    """The named builds' processes, started before the backends (see ModelProxy)."""
    proxies: dict[str, ModelProxy] = {}
    for name in names:
        if name not in PROXY_NAMES:
            continue
        source = REPO if name == "model-proxy" else compiled_copy(workdir / "compiled-source")
        proxy = ModelProxy(workdir, backend_ports, name=name, source=source)
        cleanup.callback(proxy.stop)
        proxy.launch()
        proxies[name] = proxy
    return proxies
