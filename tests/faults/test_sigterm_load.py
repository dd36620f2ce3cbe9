"""SIGTERM under load loses nothing: while clients keep sending /predict to the echo example
and 5 SSE streams are open, the proxy is told to stop. Every request sent before the
listener closed is answered by the model server (200, the echo), every stream ends with
[DONE]; a request after the listener closed is refused cleanly (connection refused, or 503
draining on a kept-alive connection) — never a reset, a truncated body or a 502.

The drain's order step by step: tests/test_shutdown.py.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
from pathlib import Path

import aiohttp

from ..conftest import RunningProxy, run_proxy, write_config

CLIENTS = 12
REQUESTS_PER_CLIENT = 30  # each takes the model's 50 ms: the load lasts about 2 s
STREAMS = 5  # of 80 events 50 ms apart: they last longer than the load
SIGTERM_AFTER = 60  # answers: the signal comes early in the load
SAFETY = 30


async def one_request(
    session: aiohttp.ClientSession, url: str, client: int, index: int
) -> tuple[str, str]:
    """(outcome, detail): ok / refused are clean; anything else is a loss."""
    payload = {"client": client, "index": index}
    try:
        async with session.post(url + "/predict?delay=0.05", json=payload) as response:
            body = await response.read()
            if response.status == 200:
                if json.loads(body) == {"echo": payload, "model": "echo"}:
                    return "ok", ""
                return "wrong body", repr(body[:200])
            if response.status == 503 and json.loads(body)["error"]["type"] == "draining":
                return "refused", "503 draining"
            return f"status {response.status}", repr(body[:200])
    except aiohttp.ClientConnectorError as error:
        if isinstance(error.os_error, ConnectionRefusedError):
            return "refused", "connection refused"
        return "connect error", repr(error)
    except aiohttp.ClientError as error:  # reset, disconnected, truncated
        return type(error).__name__, repr(error)


async def stream(session: aiohttp.ClientSession, url: str) -> list[bytes]:
    async with session.get(url + "/sync/stream?n=80&interval=0.05") as response:
        assert response.status == 200
        return [line async for line in response.content if line.startswith(b"data: ")]


async def test_sigterm_under_load_loses_no_request_and_no_stream(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        predict_concurrency=64,
        # a quiet period long enough that the load (one request after another on each
        # client) never pauses that long: the listener closes once the load is over
        proxy={"drain_quiet_seconds": 1.0, "shutdown_grace_seconds": 20},
    )
    outcomes: collections.Counter[str] = collections.Counter()
    losses: list[str] = []
    answered = asyncio.Event()
    signalled: list[bool] = []  # set once SIGTERM has been sent
    served_after_signal = 0

    async def client(session: aiohttp.ClientSession, proxy: RunningProxy, number: int) -> None:
        nonlocal served_after_signal
        for index in range(REQUESTS_PER_CLIENT):
            sent_after_signal = bool(signalled)
            outcome, detail = await one_request(session, proxy.url, number, index)
            outcomes[outcome] += 1
            if outcome not in ("ok", "refused"):
                losses.append(f"client {number} request {index}: {outcome} {detail}")
            if outcome == "ok" and sent_after_signal:
                served_after_signal += 1
            if outcomes["ok"] >= SIGTERM_AFTER:
                answered.set()

    async with (
        run_proxy(config) as proxy,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        async with asyncio.timeout(SAFETY):
            streams = [asyncio.create_task(stream(session, proxy.url)) for _ in range(STREAMS)]
            clients = [
                asyncio.create_task(client(session, proxy, number)) for number in range(CLIENTS)
            ]
            await answered.wait()
            proxy.signal(signal.SIGTERM)
            signalled.append(True)
            await asyncio.gather(*clients)
            events = await asyncio.gather(*streams)
            closed = await proxy.wait_for_log(r"listener closed; \d+ requests in flight")
            # on a new connection: a kept-alive one may get 503 draining (tests/test_shutdown.py)
            # or race the proxy's exit, as any keep-alive reuse may (RFC 9112 §9.3.1)
            async with aiohttp.ClientSession() as fresh:
                late = await one_request(fresh, proxy.url, -1, 0)
            assert await proxy.exited() == 0

    assert losses == []
    assert late == ("refused", "connection refused")
    assert closed.endswith(f"; {STREAMS} requests in flight")  # the streams outlived the listener
    assert outcomes["ok"] == CLIENTS * REQUESTS_PER_CLIENT  # the load ended before the listener
    assert served_after_signal > 0  # the drain served requests sent after the signal
    for lines in events:
        assert len(lines) == 81
        assert lines[-1] == b"data: [DONE]\n"
    assert "stream cancelled" not in proxy.log
    assert "still in flight after the grace" not in proxy.log
