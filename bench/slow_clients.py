"""Slow clients against the proxy: slowhttptest (Debian's package) in slow-body (-B) and
slow-read (-X) modes holds 1,000 connections open for a minute against the echo example
behind model-proxy with predict_concurrency 4, while a normal client POSTs /predict ten
times a second. Prints, per mode, how many of the normal requests got 200 and how fast.

    python -m bench.slow_clients [--seconds 60] [--connections 1000]

-B trickles request bodies (Content-Length 8192, a little every 10 s): a body up to
proxy.buffer_request_body_bytes is read whole before it asks for a slot, so none is held.
-X reads responses through a window of 10-20 bytes, 32 bytes every 5 s, of pipelined
64 KiB downloads: their answers wait in the proxy's write buffers, not on a slot (and a
client that takes nothing for client_send_timeout_seconds is cut).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from .procs import Service, free_port, peak_rss_mib, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "examples" / "echo" / "server.py"
PROBE_INTERVAL = 0.1
PROBE_TIMEOUT = 2.0


def ensure_slowhttptest() -> str:
    found = shutil.which("slowhttptest")
    if found:
        return found
    print("installing slowhttptest from Debian", flush=True)
    quiet = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=quiet)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slowhttptest"], check=True, env=quiet)
    return shutil.which("slowhttptest") or "slowhttptest"


def write_config(directory: Path, port: int) -> Path:
    server_port = free_port()
    config = {
        "model_name": "echo",
        "docker_server": {
            "start_command": f"{sys.executable} {ECHO} --port {server_port}",
            "server_port": server_port,
            "predict_endpoint": "/predict",
            "readiness_endpoint": "/health",
        },
        "runtime": {"predict_concurrency": 4},
        "proxy": {"host": "127.0.0.1", "port": port, "access_log": False},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def attack(mode: str, tool: str, url: str, connections: int, seconds: int) -> list[str]:
    common = ["-c", str(connections), "-r", "200", "-l", str(seconds), "-p", "3"]
    if mode == "B":
        return [tool, "-B", *common, "-i", "10", "-s", "8192", "-t", "POST", "-u", url + "/predict"]
    reads = ["-k", "4", "-n", "5", "-w", "10", "-y", "20", "-z", "32"]
    return [tool, "-X", *common, *reads, "-u", url + "/sync/download?size=65536"]


async def probe(url: str, until: float) -> tuple[list[int], list[float]]:
    """POST /predict every PROBE_INTERVAL until `until`; each request's status (0: failed or
    slower than PROBE_TIMEOUT) and latency."""
    statuses: list[int] = []
    latencies: list[float] = []
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                async with session.post(url + "/predict", json={"probe": 1}) as response:
                    await response.read()
                    statuses.append(response.status)
            except (aiohttp.ClientError, TimeoutError):
                statuses.append(0)
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(max(0.0, PROBE_INTERVAL - (time.monotonic() - started)))
    return statuses, latencies


def run_mode(mode: str, tool: str, connections: int, seconds: int, work: Path) -> str:
    port = free_port()
    config = write_config(work, port)
    proxy = Service.start(
        "model-proxy",
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        log=work / f"proxy-{mode}.log",
        cwd=ROOT,
    )
    try:
        wait_for_port(port, proxy)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(_until_ready(url))
        argv = attack(mode, tool, url, connections, seconds)
        with (work / f"slowhttptest-{mode}.log").open("wb") as log:
            slow = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            statuses, latencies = asyncio.run(probe(url, time.monotonic() + seconds))
            slow.wait()
        tail = (work / f"slowhttptest-{mode}.log").read_text(errors="replace")
        connected = _last_connected(tail)
        ok = statuses.count(200)
        latencies.sort()
        p50 = statistics.median(latencies) * 1000
        p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
        share = f"{ok} ({100 * ok / len(statuses):.1f}%)"
        figures = f"{p50:.1f} | {p99:.1f} | {latencies[-1] * 1000:.0f}"
        rss = peak_rss_mib([proxy.pid])
        return f"| -{mode} | {connected} | {len(statuses)} | {share} | {figures} | {rss:.0f} |"
    finally:
        proxy.stop(timeout=40)


async def _until_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(30):
        while True:
            async with session.get(url + "/ready") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.05)


def _last_connected(log: str) -> str:
    """The most connections slowhttptest held open at once, from its status lines."""
    log = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", log)  # its colours
    counts = [
        int(line.split(":")[1])
        for line in log.splitlines()
        if line.strip().startswith("connected:") and line.split(":")[1].strip().isdigit()
    ]
    return str(max(counts)) if counts else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--modes", default="BX", help="B, X or BX")
    args = parser.parse_args(argv)
    tool = ensure_slowhttptest()
    rows = []
    with tempfile.TemporaryDirectory(prefix="slow-clients-") as directory:
        for mode in args.modes:
            print(
                f"slowhttptest -{mode}: {args.connections} connections, {args.seconds} s",
                flush=True,
            )
            rows.append(run_mode(mode, tool, args.connections, args.seconds, Path(directory)))
    print()
    columns = ["mode", "slow connections held", "normal /predict", "200", "p50 ms", "p99 ms"]
    columns += ["max ms", "proxy peak RSS MiB"]
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
