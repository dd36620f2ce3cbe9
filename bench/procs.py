"""Processes under measurement: start pinned to a CPU, wait for a port, and read what
/proc says they cost (CPU time, resident memory, peak resident memory)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SCHEDSTAT = Path("/proc/self/schedstat").exists()
LOADGEN_CPU = 0  # wrk and the Python clients
SERVER_CPU = 1  # the proxy under test and the backend share this one


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


@dataclass
class Service:
    """A long-running process of the bench (a backend or a proxy), with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        cwd: Path | None = None,
        cpu: int = SERVER_CPU,
    ) -> Service:
        with log.open("wb") as out:
            process = subprocess.Popen(
                pinned(cpu, argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                start_new_session=True,  # its own group: stopped as a whole, spared our Ctrl-C
            )
        return cls(name, process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{tail}")

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def wait_for_port(port: int, service: Service, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        service.check_alive()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{service.name}: nothing listens on port {port} after {timeout} s")


def http_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """The status of a GET, or None if the connection fails; a blocking one-shot probe."""
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as sock:
            sock.sendall(request)
            head = sock.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system) of the processes, all their threads, in seconds.

    From each thread's schedstat, in nanoseconds: utime + stime in /proc/<pid>/stat count
    10 ms ticks, too coarse for a run that costs a proxy a few tens of milliseconds. A
    thread that ends during a run takes its time with it; the proxies' threads do not end.
    Without schedstat (a kernel built without it), utime + stime it is."""
    if not SCHEDSTAT:
        return sum(_stat_cpu_seconds(pid) for pid in pids)
    total_ns = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue  # the process is gone
        for task in tasks:
            try:
                total_ns += int((task / "schedstat").read_text().split()[0])
            except OSError:
                continue  # the thread is gone
    return total_ns / 1e9


def _stat_cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # the command name may hold spaces: the fields that follow it start after ")"
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14, 15


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mib(pids: Iterable[int]) -> float:
    return sum(_status_kib(pid, "VmRSS") for pid in pids) / 1024


def peak_rss_mib(pids: Iterable[int]) -> float:
    return sum(_status_kib(pid, "VmHWM") for pid in pids) / 1024


def reset_peak_rss(pids: Iterable[int]) -> None:
    """Start a new high-water mark from the current RSS (clear_refs "5", Linux >= 4.0)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_busy_seconds() -> dict[int, float]:
    """Per CPU, the seconds spent not idle since boot (from /proc/stat)."""
    busy: dict[int, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values]
            idle = ticks[3] + ticks[4]  # idle + iowait
            busy[int(name[3:])] = (sum(ticks[:8]) - idle) / CLOCK_TICKS
    return busy
