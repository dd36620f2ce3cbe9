"""Probing the model server: one probe (mechanism) and the loops that turn probes into
readiness and liveness decisions (policy). Interval, deadline and clock are parameters."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import aiohttp

Probe = Callable[[], Awaitable[bool]]
Clock = Callable[[], float]
Report = Callable[[str], None]  # what a probe saw, in words: "HTTP 503", "connection refused"


async def probe_http(
    session: aiohttp.ClientSession, url: str, timeout: float, report: Report | None = None
) -> bool:
    """True for a 2xx answer; any other status, a refused connection or a timeout is False."""
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False
        ) as response:
            status = response.status
    except TimeoutError:
        seen = f"no answer within {timeout:g} s"
    except aiohttp.ServerDisconnectedError:
        seen = "the connection closed without an answer"
    except aiohttp.ClientConnectorError as exc:
        seen = _os_error(exc.os_error)
    except (aiohttp.ClientError, OSError) as exc:
        seen = _os_error(exc)
    else:
        if report is not None:
            report(f"HTTP {status}")
        return 200 <= status < 300
    if report is not None:
        report(seen)
    return False


async def probe_tcp(host: str, port: int, timeout: float, report: Report | None = None) -> bool:
    """True when the port accepts a TCP connection."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        seen = f"no connection within {timeout:g} s"
    except OSError as exc:
        seen = _os_error(exc)
    else:
        writer.close()
        if report is not None:
            report("connection accepted")
        return True
    if report is not None:
        report(seen)
    return False


def _os_error(exc: BaseException) -> str:
    """`connection refused` rather than the library's sentence around it."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


async def wait_until_ready(probe: Probe, *, interval: float, deadline: float, clock: Clock) -> bool:
    """Probe every `interval` until one passes (True) or `deadline` on `clock` passes (False)."""
    while True:
        if await probe():
            return True
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(interval, remaining))


async def watch(
    probe: Probe,
    *,
    interval: float,
    threshold: float,
    on_change: Callable[[bool], None],
    clock: Clock,
) -> None:
    """Probe every `interval` forever; report False once probes have failed without a
    break for `threshold` seconds, and True again at the first success after that."""
    failing_since: float | None = None
    healthy = True
    while True:
        ok = await probe()
        now = clock()
        if ok:
            failing_since = None
            if not healthy:
                healthy = True
                on_change(True)
        else:
            if failing_since is None:
                failing_since = now
            if healthy and now - failing_since >= threshold:
                healthy = False
                on_change(False)
        await asyncio.sleep(interval)
