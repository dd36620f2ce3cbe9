"""SIGTERM/SIGINT behind the real CLI: the drain in its documented order, the child's
process group stopped (SIGKILL after the grace), a forced exit, and nothing left behind."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from .children import SAFETY, fetch, model_config
from .conftest import RunningProxy, group_pids, process_alive, run_proxy, write_config

HOLD = r"\[model-server stdout\] holding {}$"


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length off a raw connection."""
    async with asyncio.timeout(SAFETY):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.rstrip("\r\n").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


async def assert_refused(proxy: RunningProxy) -> None:
    with pytest.raises(ConnectionRefusedError):
        async with asyncio.timeout(SAFETY):
            await asyncio.open_connection("127.0.0.1", proxy.port)


async def test_sigterm_stops_readiness_serves_the_quiet_period_and_finishes_a_stream(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    config = write_config(tmp_path, proxy={"drain_quiet_seconds": 0.5})
    async with run_proxy(config) as proxy:
        _, body, _ = await fetch(session, proxy.url + "/health")
        pgid = body["pid"]
        assert pgid in set(group_pids(pgid))

        async with session.get(proxy.url + "/sync/stream?n=10&interval=0.2") as stream:
            assert stream.status == 200
            lines = [await stream.content.readline()]  # the first event is out
            proxy.signal(signal.SIGTERM)
            await proxy.wait_for_log("received SIGTERM: draining")

            status, body, _ = await fetch(session, proxy.url + "/ready")
            assert (status, body["state"]) == (503, "draining")
            status, _, _ = await fetch(session, proxy.url + "/health")
            assert status == 200  # the child still runs
            # load balancers may still send for a moment: served as usual
            async with session.post(proxy.url + "/predict", json={"late": True}) as response:
                assert response.status == 200
                assert await response.json() == {"echo": {"late": True}, "model": "echo"}

            await proxy.wait_for_log("listener closed")
            await assert_refused(proxy)
            async with asyncio.timeout(SAFETY):
                lines += [line async for line in stream.content]

        events = [line[len(b"data: ") :] for line in lines if line.startswith(b"data: ")]
        assert [json.loads(event)["i"] for event in events[:-1]] == list(range(10))
        assert events[-1] == b"[DONE]\n"
        assert await proxy.exited() == 0
    assert list(group_pids(pgid)) == []
    assert "stream cancelled" not in proxy.log


async def test_after_the_listener_closes_a_kept_alive_connection_gets_draining(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = model_config(tmp_path, control, proxy={"drain_quiet_seconds": 0.2})
    async with run_proxy(config) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /sync/hold?file=release-k HTTP/1.1\r\nHost: proxy\r\n\r\n")
        await proxy.wait_for_log(HOLD.format("release-k"))
        held = asyncio.create_task(fetch(session, proxy.url + "/sync/hold?file=release-h"))
        await proxy.wait_for_log(HOLD.format("release-h"))

        proxy.signal(signal.SIGTERM)
        await proxy.wait_for_log("listener closed; 2 requests in flight")
        await assert_refused(proxy)

        (control / "release-k").touch()
        status, headers, body = await read_response(reader)
        assert (status, json.loads(body)) == (200, {"released": "release-k"})
        assert headers.get("connection") != "close"
        writer.write(b"POST /predict HTTP/1.1\r\nHost: proxy\r\nContent-Length: 2\r\n\r\n{}")
        status, headers, body = await read_response(reader)
        assert status == 503
        assert json.loads(body)["error"]["type"] == "draining"
        assert headers["connection"] == "close"
        assert headers["retry-after"].isdigit()
        async with asyncio.timeout(SAFETY):
            assert await reader.read() == b""  # and the proxy closed it
        writer.close()

        (control / "release-h").touch()
        status, body, _ = await held
        assert (status, body) == (200, {"released": "release-h"})
        assert await proxy.exited() == 0


async def test_a_child_ignoring_sigterm_is_killed_after_the_grace(
    tmp_path: Path, control: Path
) -> None:
    config = model_config(
        tmp_path, control, "--ignore-sigterm", proxy={"child_stop_grace_seconds": 0.3}
    )
    async with run_proxy(config) as proxy:
        pid = int((control / "server.pid").read_text())
        proxy.signal(signal.SIGTERM)
        await proxy.wait_for_log(r"\[model-server stdout\] ignoring SIGTERM")
        await proxy.wait_for_log(r"still running 0\.3 s after SIGTERM: killed")
        assert await proxy.exited() == 0
    assert not process_alive(pid)
    assert list(group_pids(pid)) == []


FORKING = "{model} & sleep 1000 & wait"  # the shell stays, with two children


async def test_a_forking_start_command_leaves_nothing_behind_after_shutdown(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    async with run_proxy(model_config(tmp_path, control, command=FORKING)) as proxy:
        _, body, _ = await fetch(session, proxy.url + "/health")
        shell = body["pid"]
        server = int((control / "server.pid").read_text())
        members = set(group_pids(shell))
        assert {shell, server} < members  # and the sleep
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited() == 0
    assert not any(process_alive(pid) for pid in members)
    assert list(group_pids(shell)) == []


async def test_a_forking_start_command_leaves_nothing_behind_after_a_restart(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = model_config(
        tmp_path,
        control,
        command=FORKING,
        health_checks={"restart_threshold_seconds": 0.3},
        proxy={"probe_interval_seconds": 0.05},
    )
    async with run_proxy(config) as proxy:
        _, body, _ = await fetch(session, proxy.url + "/health")
        shell = body["pid"]
        server = int((control / "server.pid").read_text())
        members = set(group_pids(shell))
        mark = len(proxy.lines)

        (control / f"exit-{server}").write_text("0")  # the shell keeps waiting for the sleep
        await proxy.wait_for_log("failed its liveness probe; restarting", after=mark)
        assert not any(process_alive(pid) for pid in members)
        await proxy.wait_for_log("the model server is ready", after=mark)
        _, body, _ = await fetch(session, proxy.url + "/health")
        assert body["pid"] != shell
        assert body["restarts"] == 1


async def test_a_second_sigint_forces_an_immediate_exit(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = model_config(tmp_path, control, proxy={"shutdown_grace_seconds": 60})
    async with run_proxy(config) as proxy:
        pid = int((control / "server.pid").read_text())
        held = asyncio.create_task(fetch(session, proxy.url + "/sync/hold?file=never"))
        await proxy.wait_for_log(HOLD.format("never"))
        proxy.signal(signal.SIGINT)
        await proxy.wait_for_log("received SIGINT: draining")
        proxy.signal(signal.SIGINT)
        await proxy.wait_for_log("second interrupt")
        assert await proxy.exited(timeout=SAFETY) not in (0, None)  # long before the grace
        with pytest.raises(aiohttp.ClientError):
            await held
    assert list(group_pids(pid)) == []


async def test_requests_still_in_flight_after_the_grace_are_cut(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = model_config(
        tmp_path, control, proxy={"drain_quiet_seconds": 0.1, "shutdown_grace_seconds": 0.5}
    )
    async with run_proxy(config) as proxy:
        pid = int((control / "server.pid").read_text())
        held = asyncio.create_task(fetch(session, proxy.url + "/sync/hold?file=never"))
        await proxy.wait_for_log(HOLD.format("never"))
        proxy.signal(signal.SIGTERM)
        await proxy.wait_for_log("1 requests still in flight after the grace: cutting them")
        with pytest.raises(aiohttp.ClientError):
            await held
        assert await proxy.exited() == 0
    assert list(group_pids(pid)) == []


async def test_sigterm_before_the_child_is_ready_stops_it_without_a_quiet_period(
    tmp_path: Path, control: Path
) -> None:
    # never ready, so in no load balancer's list: nothing to wait for (a quiet period as long
    # as the exit's safety net would fail the test)
    config = model_config(tmp_path, control, ready=False, proxy={"drain_quiet_seconds": 3 * SAFETY})
    async with run_proxy(config, wait_ready=False) as proxy:
        await proxy.wait_for_log(r"\[model-server stdout\] model server listening")
        pid = int((control / "server.pid").read_text())
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited(timeout=SAFETY) == 0
    assert list(group_pids(pid)) == []
    assert "restarting" not in proxy.log
    assert "the model server was never ready: no quiet period" in proxy.log


async def test_sigterm_during_the_restart_backoff_starts_no_new_child(
    tmp_path: Path, control: Path
) -> None:
    async with run_proxy(model_config(tmp_path, control)) as proxy:
        pid = int((control / "server.pid").read_text())
        (control / f"exit-{pid}").write_text("3")
        await proxy.wait_for_log("exited; restarting in 1 s")
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited() == 0
    assert len(re.findall(r"started the model server", proxy.log)) == 1
