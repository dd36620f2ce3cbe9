"""A client that leaves mid-request or mid-stream: the model server sees its request
cancelled at once (it says so in the log), the concurrency slot is free again (with one
slot, the next request runs), and the request is counted 499.

The same with fake model servers in process: tests/test_forward.py,
test_a_client_that_leaves_cancels_the_upstream_request and _mid_stream_cancels_the_stream.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from ..conftest import RunningProxy, run_proxy, write_config
from . import SAFETY, fault_config, samples


async def assert_slot_free_and_499(
    session: aiohttp.ClientSession, proxy: RunningProxy, method: str
) -> None:
    # one slot: had the cancelled request kept it, this one would wait in the queue
    async with asyncio.timeout(SAFETY), session.post(proxy.url + "/predict", json={}) as response:
        assert response.status == 200
    metrics = await samples(session, proxy.url)
    assert metrics[f'model_proxy_requests_total{{code="499",method="{method}",route="sync"}}'] == 1
    assert metrics["model_proxy_requests_in_flight"] == 0


async def test_leaving_mid_stream_stops_the_echo_stream(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with run_proxy(write_config(tmp_path, predict_concurrency=1)) as proxy:
        async with (
            asyncio.timeout(SAFETY),
            session.get(proxy.url + "/sync/stream?n=1000&interval=0.02") as stream,
        ):
            assert stream.status == 200
            for _ in range(3):
                assert (await stream.content.readuntil(b"\n\n")).startswith(b"data: ")
            stream.close()  # the connection goes with it
        line = await proxy.wait_for_log(
            r"\[model-server stdout\] stream cancelled after \d+ events"
        )
        assert int(line.split()[-2]) < 1000
        await assert_slot_free_and_499(session, proxy, "GET")


async def test_leaving_while_the_child_works_cancels_its_request(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    async with run_proxy(fault_config(tmp_path, control, predict_concurrency=1)) as proxy:
        async with asyncio.timeout(SAFETY):
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET /sync/wait HTTP/1.1\r\nHost: proxy\r\n\r\n")
            await proxy.wait_for_log(r"\[model-server stdout\] waiting for the client")
            writer.close()
        await proxy.wait_for_log(r"\[model-server stdout\] client went away")
        await assert_slot_free_and_499(session, proxy, "GET")


async def test_leaving_mid_body_cuts_the_upload_to_the_child(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    async with run_proxy(fault_config(tmp_path, control, predict_concurrency=1)) as proxy:
        async with asyncio.timeout(SAFETY):
            _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(
                b"POST /sync/upload HTTP/1.1\r\nHost: proxy\r\nContent-Length: 100000\r\n\r\n"
                + b"x" * 1000
            )
            await proxy.wait_for_log(r"receiving an upload of 100000 bytes")
            writer.close()
        line = await proxy.wait_for_log(r"\[model-server stdout\] upload cut after \d+ bytes")
        assert int(line.split()[-2]) <= 1000
        await assert_slot_free_and_499(session, proxy, "POST")
