"""The test harness: real model servers and real proxies on loopback, nothing mocked.

- `fake_upstream(app)`: an aiohttp application served on 127.0.0.1:<free port>, the model
  server for in-process forwarding tests (its handlers can wait on events the test sets);
- `in_process_proxy(...)`: the proxy's `Proxy` wiring listening on a free port in the test's
  own (uvloop) event loop, with the model server marked ready, for forwarding tests;
- `run_proxy(config_path)`: the real CLI (`python -m proxy run`) as a subprocess, its log
  lines readable with `wait_for_log`, for lifecycle, signal and drain tests;
- `write_config(...)`: a Truss-style config.yaml, by default in front of examples/echo;
- `promtool_problems(text)`: what Prometheus' own `promtool check metrics` finds in an
  exposition (when .ci/run or the machine provides promtool).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
import yaml
from aiohttp import web

from proxy.app import Proxy
from proxy.config import load_config
from proxy.protocol import ClientConnection

ROOT = Path(__file__).resolve().parent.parent
ECHO_SERVER = ROOT / "examples" / "echo" / "server.py"
STARTUP_TIMEOUT = 20.0


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop}  # the loop production runs on


@pytest.fixture
def control(tmp_path: Path) -> Path:
    """The directory through which a test drives its child model server."""
    directory = tmp_path / "control"
    directory.mkdir()
    return directory


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def echo_command(port: int, *extra: str) -> str:
    return " ".join([sys.executable, str(ECHO_SERVER), "--port", str(port), *extra])


def write_config(
    directory: Path,
    *,
    server_port: int | None = None,
    start_command: str | None = None,
    predict_endpoint: str = "/predict",
    readiness_endpoint: str | None = "/health",
    liveness_endpoint: str | None = "/health",
    predict_concurrency: int = 4,
    health_checks: dict[str, float] | None = None,
    proxy: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A config.yaml in `directory`; by default the echo example on a free port, the
    proxy on another free port, and short drain timings so tests stay fast."""
    server_port = server_port or free_port()
    docker_server: dict[str, Any] = {
        "start_command": start_command or echo_command(server_port),
        "server_port": server_port,
        "predict_endpoint": predict_endpoint,
    }
    if readiness_endpoint:
        docker_server["readiness_endpoint"] = readiness_endpoint
    if liveness_endpoint:
        docker_server["liveness_endpoint"] = liveness_endpoint
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "drain_quiet_seconds": 0.2,
        "shutdown_grace_seconds": 10,
        "child_stop_grace_seconds": 5,
        "secrets_dir": str(directory),
    }
    settings.update(proxy or {})
    document: dict[str, Any] = {
        "model_name": "test-model",
        "docker_server": docker_server,
        "runtime": {"predict_concurrency": predict_concurrency},
        "proxy": settings,
    }
    if health_checks:
        document["runtime"]["health_checks"] = health_checks
    document.update(extra or {})
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@asynccontextmanager
async def fake_upstream(app: web.Application, **options: Any) -> AsyncIterator[int]:
    """Serve `app` on 127.0.0.1; yields its port. `options` go to `web.AppRunner`
    (`handler_cancellation=True`: a handler is cancelled when its client leaves)."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, **options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port: int = runner.addresses[0][1]
    try:
        yield port
    finally:
        await runner.cleanup()


class Connections(set[ClientConnection]):
    """The proxy's client connections, saying when their number changes."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def add(self, connection: ClientConnection) -> None:
        super().add(connection)
        self._changed.set()

    def discard(self, connection: ClientConnection) -> None:
        super().discard(connection)
        self._changed.set()

    async def until(self, count: int) -> None:
        """Until exactly `count` connections are left (a lingering close takes a moment)."""
        async with asyncio.timeout(10):
            while len(self) != count:
                self._changed.clear()
                await self._changed.wait()

    async def closed(self) -> None:
        """Until the proxy has let go of every connection."""
        await self.until(0)


@asynccontextmanager
async def in_process_proxy(
    directory: Path, upstream_port: int, **config: Any
) -> AsyncIterator[tuple[Proxy, str]]:
    """The proxy in this event loop in front of `upstream_port`, model server ready.
    `config` goes to `write_config` (`proxy={...}` for the proxy: section)."""
    path = write_config(directory, server_port=upstream_port, start_command="true", **config)
    proxy = Proxy(load_config(path))
    proxy.connections = Connections()
    proxy.state.enter("ready", os.getpid())
    loop = asyncio.get_running_loop()
    server = await loop.create_server(proxy.connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield proxy, f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for connection in list(proxy.connections):
            connection.abort()
        for h2_connection in list(proxy.h2_connections):
            h2_connection.abort()
        for undecided in list(proxy.sniffing):
            undecided.close()
        for tunnel in list(proxy.tunnels):
            tunnel.abort()
        proxy.pool.close()
        if proxy.grpc_upstream is not None:
            proxy.grpc_upstream.close()
        await server.wait_closed()


class RunningProxy:
    """`python -m proxy run` as a child of the test, with its log lines collected."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self._new_line = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            async with self._new_line:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._new_line.notify_all()

    async def wait_for_log(self, pattern: str, *, after: int = 0, timeout: float = 10) -> str:
        """The first log line from index `after` on that matches `pattern`."""
        regex = re.compile(pattern)
        seen = after
        async with asyncio.timeout(timeout), self._new_line:
            while True:
                for line in self.lines[seen:]:
                    if regex.search(line):
                        return line
                seen = len(self.lines)
                if self._reader.done():
                    raise AssertionError(f"proxy exited before logging {pattern!r}:\n{self.log}")
                await self._new_line.wait()

    async def exited(self, timeout: float = 30) -> int:
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self._reader
        return code

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


@asynccontextmanager
async def run_proxy(config: Path, *, wait_ready: bool = True) -> AsyncIterator[RunningProxy]:
    """Run the real CLI on `config`; on exit it is stopped (SIGKILL if it lingers)."""
    port = yaml.safe_load(config.read_text())["proxy"]["port"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--config",
        str(config),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    running = RunningProxy(process, port)
    try:
        if wait_ready:
            await running.wait_for_log("the model server is ready", timeout=STARTUP_TIMEOUT)
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGINT)  # the second one forces
            try:
                await running.exited(timeout=15)
            except TimeoutError:
                process.kill()
                await process.wait()
        running._reader.cancel()


# .ci/run takes promtool from Debian's prometheus package and says where in $PROMTOOL
PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool")


async def promtool_problems(exposition: str) -> list[str] | None:
    """`promtool check metrics` on `exposition`: its complaints, one a line, each naming the
    metric first (a parse error starts with "error"); None when promtool is not here."""
    if PROMTOOL is None:
        return None
    process = await asyncio.create_subprocess_exec(
        PROMTOOL,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate(exposition.encode())
    problems = out.decode().splitlines()
    assert (process.returncode == 0) == (not problems), out  # 3: lint problems, 1: errors
    return problems


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


def group_pids(pgid: int) -> Iterator[int]:
    """Live processes whose process group is `pgid`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            yield int(entry.name)
