"""A client that leaves mid-request or mid-stream: the model server sees its request
cancelled at once (it says so in the log), the concurrency slot is free again (with one
slot, the next request runs), and the request is counted as nginx logs it: 499 when the
client left before the response head, else the status that was sent; every early leave in
model_proxy_client_disconnects_total by phase.

The same with fake model servers in process: tests/test_forward.py,
test_a_client_that_leaves_cancels_the_upstream_request and _mid_stream_cancels_the_stream.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from ..conftest import RunningProxy, run_proxy, write_config
from . import SAFETY, fault_config, samples


async def assert_slot_free_and_counted(
    session: aiohttp.ClientSession, proxy: RunningProxy, method: str, code: int, phase: str
) -> None:
    # one slot: had the cancelled request kept it, this one would wait in the queue
    async with asyncio.timeout(SAFETY), session.post(proxy.url + "/predict", json={}) as response:
        assert response.status == 200
        await response.read()  # unread, aiohttp would drop the connection: a disconnect too
    metrics = await samples(session, proxy.url)
    assert (
        metrics[f'model_proxy_requests_total{{code="{code}",method="{method}",route="sync"}}'] == 1
    )
    assert metrics["model_proxy_requests_in_flight"] == 0
    assert metrics[f'model_proxy_client_disconnects_total{{phase="{phase}"}}'] == 1
    others = {"queued", "waiting", "streaming"} - {phase}
    assert all(metrics[f'model_proxy_client_disconnects_total{{phase="{p}"}}'] == 0 for p in others)


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
        # the head went out with status 200: that is what the client got, as nginx logs it
        await assert_slot_free_and_counted(session, proxy, "GET", 200, "streaming")


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
        await assert_slot_free_and_counted(session, proxy, "GET", 499, "waiting")


async def test_leaving_mid_body_cuts_the_upload_to_the_child(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    # a body larger than the proxy buffers streams to the child as it comes
    streamed = {"buffer_request_body_bytes": 1000}
    config = fault_config(tmp_path, control, predict_concurrency=1, proxy=streamed)
    async with run_proxy(config) as proxy:
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
        await assert_slot_free_and_counted(session, proxy, "POST", 499, "waiting")


async def test_leaving_mid_body_of_a_buffered_upload_never_reaches_the_child(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    async with run_proxy(fault_config(tmp_path, control, predict_concurrency=1)) as proxy:
        async with asyncio.timeout(SAFETY):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(
                b"POST /sync/upload HTTP/1.1\r\nHost: proxy\r\nContent-Length: 100000\r\n\r\n"
                + b"x" * 1000
            )
            # the proxy holds the body until it is whole: a request behind it runs at once
            # on the one slot, and the child never hears of the upload
            async with session.post(proxy.url + "/predict", json={"x": 1}) as response:
                assert response.status == 200
                await response.read()
            writer.close()
            await reader.read()  # the proxy closed its side: the loss was seen
        await assert_slot_free_and_counted(session, proxy, "POST", 499, "queued")
        assert not [line for line in proxy.lines if "receiving an upload" in line]
