"""One measured run (the load generator's figures plus what /proc says the target cost),
and the measurements that are not load runs: memory at rest and readiness latency."""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .backends import Backends
from .loadgen import client
from .loadgen.stats import Measurement
from .procs import (
    cpu_busy_seconds,
    cpu_seconds,
    free_port,
    http_status,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
)
from .scenarios import Scenario
from .targets import Target, model_proxy_config, start_model_proxy

IDLE_CONNECTIONS = 256
READY_POLL_SECONDS = 0.002
LOAD_SECONDS = 1.0  # the readiness experiment's model "loads" this long


@dataclass
class Run:
    scenario: str
    target: str
    rep: int
    measurement: Measurement | None
    error: str | None = None
    proxy_cpu_s: float = 0.0  # the target's processes (none for direct)
    backend_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    wall_s: float = 0.0
    peak_rss_mib: float | None = None  # the target's, over this run
    # CPU time on each core that neither the target, the backend nor the load generator
    # used during the run: other work on the machine, i.e. noise
    foreign_cpu: dict[int, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(
    scenario: Scenario,
    target: Target,
    backends: Backends,
    *,
    rep: int,
    duration: float,
    workdir: Path,
) -> Run:
    pids = target.pids(scenario.backend)
    backend_pids = backends.pids(scenario.backend)
    reset_peak_rss(pids)
    proxy0, backend0, loadgen0 = cpu_seconds(pids), cpu_seconds(backend_pids), _children_cpu()
    busy0, wall0 = cpu_busy_seconds(), time.monotonic()
    try:
        measurement: Measurement | None = scenario.run(target, duration, workdir)
        error = None
    except Exception as exc:  # a failed run is reported, the others go on
        measurement, error = None, f"{type(exc).__name__}: {exc}"
    wall = time.monotonic() - wall0
    busy = cpu_busy_seconds()
    proxy = cpu_seconds(pids) - proxy0
    backend = cpu_seconds(backend_pids) - backend0
    loadgen = _children_cpu() - loadgen0
    used = {0: loadgen, 1: proxy + backend}
    # clamped: over a short run, /proc/stat's 10 ms ticks can count more than the wall time
    foreign = {
        cpu: min(max(busy[cpu] - busy0[cpu] - used.get(cpu, 0.0), 0.0) / wall, 1.0) for cpu in busy
    }
    return Run(
        scenario=scenario.name,
        target=target.name,
        rep=rep,
        measurement=measurement,
        error=error,
        proxy_cpu_s=proxy,
        backend_cpu_s=backend,
        loadgen_cpu_s=loadgen,
        wall_s=wall,
        peak_rss_mib=peak_rss_mib(pids) if pids else None,
        foreign_cpu=foreign,
    )


def memory_at_rest(target: Target, backend: str = "static") -> dict[str, float]:
    """RSS as started, then with IDLE_CONNECTIONS keep-alive connections open and quiet
    (each made one request, all at once)."""
    pids = target.pids(backend)
    idle = rss_mib(pids)
    holder = client.hold_idle(target.port(backend), target.path("/predict"), IDLE_CONNECTIONS)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        if not line or json.loads(line)["failed"]:
            raise RuntimeError(f"idle connections to {target.name}: {line.strip() or 'failed'}")
        time.sleep(0.2)  # let the target settle after the burst before reading its RSS
        held = rss_mib(pids)
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(10)
    return {"idle_rss_mib": idle, "rss_256_idle_mib": held}


def readiness_latency(workdir: Path) -> float:
    """Seconds from the model server reporting ready (/health 200, its own clock) to the
    proxy's /ready answering 200, polled every READY_POLL_SECONDS."""
    port, server_port = free_port(), free_port()
    stamp = workdir / f"ready-{port}.txt"
    command = (
        f"exec {sys.executable} -m bench.model_server --port {server_port}"
        f" --load-seconds {LOAD_SECONDS:g} --ready-file {stamp}"
    )
    config = model_proxy_config(
        workdir,
        name=f"model-proxy-readiness-{port}",
        port=port,
        server_port=server_port,
        start_command=command,
        readiness_endpoint="/health",
    )
    service = start_model_proxy(config, "model-proxy (readiness)", workdir / f"{config.stem}.log")
    try:
        deadline = time.monotonic() + 30
        while http_status(port, "/ready") != 200:
            service.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"/ready never turned 200; see {service.log}")
            time.sleep(READY_POLL_SECONDS)
        ready_at = time.time()
        return ready_at - float(stamp.read_text())
    finally:
        service.stop()
