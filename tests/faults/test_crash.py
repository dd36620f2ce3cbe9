"""The model server dies while it answers (mid-stream) or as a request arrives: the client
gets a cut stream or a 502 at once, never a hang, and the child is restarted and counted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from ..conftest import run_proxy
from . import READY, SAFETY, STARTED, fault_config, pid_in, samples


async def read_lines(response: aiohttp.ClientResponse, lines: list[bytes]) -> None:
    async for line in response.content:
        lines.append(line)


async def test_a_child_dying_mid_stream_cuts_the_stream_and_is_restarted(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    async with run_proxy(fault_config(tmp_path, control)) as proxy:
        first = pid_in(await proxy.wait_for_log(STARTED))
        mark = len(proxy.lines)
        events: list[bytes] = []
        async with asyncio.timeout(SAFETY), session.get(proxy.url + "/sync/stream") as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"] == "text/event-stream"
            with pytest.raises(aiohttp.ClientPayloadError):  # cut, not ended, not hanging
                await read_lines(stream, events)
        assert [line for line in events if line.startswith(b"data:")] == [
            b"data: 0\n",
            b"data: 1\n",
            b"data: 2\n",
        ]
        await proxy.wait_for_log(r"crashing after 3 events", after=mark)
        await proxy.wait_for_log(rf"\(pid {first}\) exited with code 1", after=mark)
        second = pid_in(await proxy.wait_for_log(STARTED, after=mark))
        await proxy.wait_for_log(READY, after=mark)
        assert second != first

        async with session.post(proxy.url + "/predict") as response:
            assert (response.status, await response.json()) == (200, {"pid": second})
        metrics = await samples(session, proxy.url)
        assert metrics["model_proxy_upstream_restarts_total"] == 1
        # the stream had started: counted with the status the client saw
        assert metrics['model_proxy_requests_total{code="200",method="GET",route="sync"}'] == 1


async def test_a_child_dying_on_the_request_is_502_and_is_restarted(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    async with run_proxy(fault_config(tmp_path, control)) as proxy:
        first = pid_in(await proxy.wait_for_log(STARTED))
        mark = len(proxy.lines)
        async with asyncio.timeout(SAFETY), session.post(proxy.url + "/sync/die") as response:
            assert response.status == 502
            assert (await response.json())["error"]["type"] == "upstream_unavailable"
            assert response.headers["X-Request-ID"]
        await proxy.wait_for_log("dying on a request", after=mark)
        await proxy.wait_for_log(rf"\(pid {first}\) exited with code 1", after=mark)
        second = pid_in(await proxy.wait_for_log(STARTED, after=mark))
        await proxy.wait_for_log(READY, after=mark)

        async with session.post(proxy.url + "/predict") as response:
            assert (response.status, await response.json()) == (200, {"pid": second})
        metrics = await samples(session, proxy.url)
        assert metrics["model_proxy_upstream_restarts_total"] == 1
        assert metrics['model_proxy_requests_total{code="502",method="POST",route="sync"}'] == 1
