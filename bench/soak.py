"""Soak: the real CLI in front of the echo example for a long while, under mixed traffic
(JSON requests, SSE streams, WebSocket echo sessions, clients that leave mid-stream) with
two crashes of the model server (SIGKILL at 1/3 and 2/3 of the run; the proxy restarts it).

    .venv/bin/python -m bench.soak                  # 600 s
    .venv/bin/python -m bench.soak --seconds 60     # a short run

Everything is on 127.0.0.1; the number of clients is fixed and every loop stops at the
deadline. It prints what was served, the errors by kind (those that overlap a crash window,
from the kill until the child is ready again, are expected and listed apart), and the
proxy's RSS at the start (after a warm-up), the middle and the end. Exit code 0 when nothing
unexpected happened, both crashes were restarted, the RSS stayed flat and the proxy stopped
cleanly. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop
import yaml

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "examples" / "echo" / "server.py"
REQUEST_TIMEOUT = 30.0  # a request that takes longer is an error of its own ("timeout")
RETRY_AFTER = 0.1  # a client pauses this long after an error (not the header's 1 s)
SETTLE = 1.0  # a crash window ends this long after the child is ready again
RSS_FLAT = 0.05  # the end may exceed the middle by this share (or RSS_SLACK_KIB) at most
RSS_SLACK_KIB = 2048


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Tally:
    """What was served, and every error: expected if it overlaps a crash window."""

    started: float
    windows: list[list[float]] = field(default_factory=list)  # [start, end]; end inf: open
    served: collections.Counter[str] = field(default_factory=collections.Counter)
    expected: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    @property
    def errors(self) -> int:
        return sum(self.expected.values()) + sum(self.unexpected.values())

    def error(self, kind: str, began: float, detail: str = "") -> None:
        ended = self.now()
        if any(start <= ended and began <= end for start, end in self.windows):
            self.expected[kind] += 1
        else:
            self.unexpected[kind] += 1
            if len(self.examples) < 20:
                self.examples.append(f"{began:8.2f}-{ended:8.2f} s  {kind}  {detail[:200]}")


def kind_of(status: int, body: bytes) -> str:
    try:
        return f"{status} {json.loads(body)['error']['type']}"
    except (ValueError, KeyError, TypeError):
        return str(status)


def failure_kind(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, aiohttp.ClientPayloadError):
        return "cut stream"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(error, aiohttp.ClientConnectorError):
        return "connect failed"
    if isinstance(error, aiohttp.WSServerHandshakeError):
        return f"websocket handshake {error.status}"
    return type(error).__name__


class Traffic:
    def __init__(self, session: aiohttp.ClientSession, url: str, tally: Tally, until: float):
        self.session = session
        self.url = url
        self.tally = tally
        self.until = until

    def going(self) -> bool:
        return self.tally.now() < self.until

    async def run(self, name: str, one: Callable[[int], Awaitable[None]]) -> None:
        index = 0
        errors = self.tally.errors
        while self.going():
            began = self.tally.now()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await one(index)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as error:
                self.tally.error(f"{name}: {failure_kind(error)}", began, repr(error))
            index += 1
            if self.tally.errors > errors:
                errors = self.tally.errors
                await asyncio.sleep(RETRY_AFTER)  # as a client honouring Retry-After would

    async def json_request(self, index: int) -> None:
        began = self.tally.now()
        payload = {"n": index, "text": "x" * (index % 200)}
        async with self.session.post(self.url + "/predict?delay=0.01", json=payload) as response:
            body = await response.read()
        if response.status != 200:
            self.tally.error(f"json: {kind_of(response.status, body)}", began, body.decode())
        elif json.loads(body) != {"echo": payload, "model": "echo"}:
            self.tally.error("json: wrong answer", began, body.decode())
        else:
            self.tally.served["json requests"] += 1

    async def sse_stream(self, index: int) -> None:
        began = self.tally.now()
        async with self.session.get(self.url + "/sync/stream?n=20&interval=0.02") as response:
            if response.status != 200:
                body = await response.read()
                self.tally.error(f"sse: {kind_of(response.status, body)}", began, body.decode())
                return
            events = [line async for line in response.content if line.startswith(b"data: ")]
        numbers = [json.loads(event[6:])["i"] for event in events[:-1]]
        if numbers != list(range(20)) or events[-1] != b"data: [DONE]\n":
            self.tally.error("sse: wrong stream", began, repr(events[-3:]))
        else:
            self.tally.served["sse streams"] += 1
            self.tally.served["sse events"] += 20

    async def websocket_session(self, index: int) -> None:
        began = self.tally.now()
        async with self.session.ws_connect(self.url + "/sync/ws") as ws:
            for message in range(20):
                text = f"{index}:{message}"
                await ws.send_str(text)
                reply = await ws.receive()
                if reply.type != aiohttp.WSMsgType.TEXT or reply.data != text:
                    self.tally.error(f"websocket: {reply.type.name.lower()}", began, repr(reply))
                    return
        if ws.close_code != 1000:
            self.tally.error(f"websocket: closed {ws.close_code}", began)
            return
        self.tally.served["websocket sessions"] += 1
        self.tally.served["websocket messages"] += 20

    async def leave_mid_stream(self, index: int) -> None:
        began = self.tally.now()
        async with self.session.get(self.url + "/sync/stream?n=1000&interval=0.01") as response:
            if response.status != 200:
                body = await response.read()
                kind = kind_of(response.status, body)
                self.tally.error(f"disconnect: {kind}", began, body.decode())
                return
            for _ in range(3):
                if not (await response.content.readuntil(b"\n\n")).startswith(b"data: "):
                    self.tally.error("disconnect: wrong stream", began)
                    return
            response.close()  # leaves: the proxy must cancel the stream
        self.tally.served["clients that left mid-stream"] += 1


async def wait_ready(session: aiohttp.ClientSession, url: str, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with session.get(url + "/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


async def crash(session: aiohttp.ClientSession, url: str, tally: Tally) -> tuple[float, float]:
    """SIGKILL the model server's process group; (when, seconds until ready again)."""
    async with session.get(url + "/health") as response:
        pid = (await response.json())["pid"]
    window = [tally.now(), float("inf")]
    tally.windows.append(window)
    os.killpg(pid, signal.SIGKILL)
    async with asyncio.timeout(60):
        while True:  # until a new child runs (the proxy sees the exit within milliseconds)
            async with session.get(url + "/health") as response:
                if (await response.json())["pid"] not in (pid, None):
                    break
            await asyncio.sleep(0.05)
    await wait_ready(session, url, 60)
    took = tally.now() - window[0]
    window[1] = tally.now() + SETTLE
    return window[0], took


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def soak(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="model-proxy-soak-"))
    child_port, proxy_port = free_port(), free_port()
    config = workdir / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name": "soak",
                "docker_server": {
                    "start_command": f"exec {sys.executable} {ECHO} --port {child_port}",
                    "server_port": child_port,
                    "predict_endpoint": "/predict",
                    "readiness_endpoint": "/health",
                    "liveness_endpoint": "/health",
                },
                "runtime": {"predict_concurrency": 64},
                "proxy": {"host": "127.0.0.1", "port": proxy_port, "secrets_dir": str(workdir)},
            }
        )
    )
    log = workdir / "proxy.log"
    url = f"http://127.0.0.1:{proxy_port}"
    with log.open("wb") as out:
        proxy = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--config", str(config),
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    seconds = args.seconds
    print(f"soak: {seconds:g} s, proxy pid {proxy.pid} on {url}, log {log}", flush=True)
    tally = Tally(started=time.monotonic())
    rss: dict[str, int] = {}
    crashes: list[tuple[float, float]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await wait_ready(session, url, 30)
        tally.started = time.monotonic()
        traffic = Traffic(session, url, tally, until=seconds)
        workers = (
            [traffic.run("json", traffic.json_request) for _ in range(args.json_clients)]
            + [traffic.run("sse", traffic.sse_stream) for _ in range(args.sse_clients)]
            + [traffic.run("websocket", traffic.websocket_session) for _ in range(args.ws_clients)]
            + [traffic.run("disconnect", traffic.leave_mid_stream) for _ in range(2)]
        )
        tasks = [asyncio.create_task(worker) for worker in workers]

        async def at(moment: float) -> None:
            await asyncio.sleep(max(0.0, moment - tally.now()))

        warm_up = min(30.0, seconds / 10)
        await at(warm_up)
        rss["start"] = rss_kib(proxy.pid)
        print(f"{tally.now():7.1f} s  RSS {rss['start'] / 1024:.1f} MiB (start)", flush=True)
        for name, moment in (("crash", seconds / 3), ("middle", seconds / 2),
                             ("crash", 2 * seconds / 3)):  # fmt: skip
            await at(moment)
            if name == "crash":
                when, took = await crash(session, url, tally)
                crashes.append((when, took))
                print(f"{when:7.1f} s  killed the model server; ready again after {took:.2f} s")
            else:
                rss["middle"] = rss_kib(proxy.pid)
                print(f"{tally.now():7.1f} s  RSS {rss['middle'] / 1024:.1f} MiB (middle)")
            sys.stdout.flush()
        await at(seconds - 1)
        rss["end"] = rss_kib(proxy.pid)
        print(f"{tally.now():7.1f} s  RSS {rss['end'] / 1024:.1f} MiB (end)", flush=True)
        await asyncio.gather(*tasks)
        metrics = await scrape(session, url)
    proxy.send_signal(signal.SIGTERM)
    async with asyncio.timeout(60):
        code = await proxy.wait()

    text = log.read_text(errors="replace")
    cancelled = len(re.findall(r"stream cancelled after \d+ events", text))
    by_code: collections.Counter[str] = collections.Counter()
    for name, value in metrics.items():
        if name.startswith("model_proxy_requests_total{"):
            by_code[re.search(r'code="(\d+)"', name)[1]] += int(value)  # type: ignore[index]
    restarts = int(metrics.get("model_proxy_upstream_restarts_total", -1))

    print()
    print(f"served in {seconds:g} s:")
    for name, count in sorted(tally.served.items()):
        print(f"  {name:32} {count:>9}")
    print(f"  {'requests counted by the proxy':32} {sum(by_code.values()):>9}"
          f"  by code: {dict(sorted(by_code.items()))}")  # fmt: skip
    print(f"  {'streams the child saw cancelled':32} {cancelled:>9}")
    print(f"crashes: {len(crashes)}, restarts counted: {restarts}")
    for when, took in crashes:
        print(f"  at {when:.1f} s, ready again after {took:.2f} s")
    print("errors expected (overlapping a crash window):")
    for kind, count in sorted(tally.expected.items()) or [("none", 0)]:
        print(f"  {kind:40} {count:>6}")
    print("errors unexpected:")
    for kind, count in sorted(tally.unexpected.items()) or [("none", 0)]:
        print(f"  {kind:40} {count:>6}")
    for example in tally.examples:
        print(f"    {example}")
    start, middle, end = rss["start"], rss["middle"], rss["end"]
    flat = end <= max(middle * (1 + RSS_FLAT), middle + RSS_SLACK_KIB)
    print(
        f"proxy RSS: start {start / 1024:.1f} MiB, middle {middle / 1024:.1f} MiB,"
        f" end {end / 1024:.1f} MiB ({'flat' if flat else 'GROWING'})"
    )
    print(f"proxy exit code after SIGTERM: {code}")
    ok = not tally.unexpected and flat and code == 0 and restarts == len(crashes) == 2
    print("verdict:", "OK: nothing lost, RSS flat" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long (default 600)")
    parser.add_argument("--json-clients", type=int, default=8)
    parser.add_argument("--sse-clients", type=int, default=3)
    parser.add_argument("--ws-clients", type=int, default=2)
    args = parser.parse_args()
    if args.seconds < 10:
        parser.error("--seconds must be at least 10")
    return uvloop.run(soak(args))


if __name__ == "__main__":
    raise SystemExit(main())
