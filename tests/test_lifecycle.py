"""The model server's life behind the real CLI: readiness, health thresholds, exits and
restarts, liveness, and its log lines. The child is tests/children/model.py, driven through
files; every wait is on a log line, a file or a response."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from proxy.config import load_config
from proxy.lifecycle import ModelServer
from proxy.supervisor import Reaper, RestartBackoff

from .children import SAFETY, fetch, model_command, model_config
from .conftest import (
    STARTUP_TIMEOUT,
    RunningProxy,
    free_port,
    group_pids,
    process_alive,
    run_proxy,
    write_config,
)

FAST_PROBES = {"probe_interval_seconds": 0.05}
STARTED = r"started the model server \(pid (\d+)\)"
READY = r"the model server is ready after (\d+\.\d+) s"


async def started_pid(proxy: RunningProxy, after: int = 0) -> int:
    line = await proxy.wait_for_log(STARTED, after=after, timeout=STARTUP_TIMEOUT)
    match = re.search(STARTED, line)
    assert match is not None
    return int(match[1])


async def restarts_metric(session: aiohttp.ClientSession, url: str) -> float:
    async with asyncio.timeout(SAFETY), session.get(url + "/metrics") as response:
        text = await response.text()
    match = re.search(r"^model_proxy_upstream_restarts_total (\S+)$", text, re.MULTILINE)
    assert match is not None, text
    return float(match[1])


async def assert_not_ready(session: aiohttp.ClientSession, url: str) -> None:
    """/ready is 503 and a proxied request gets 503 not_ready with Retry-After."""
    status, body, _ = await fetch(session, url + "/ready")
    assert status == 503
    assert body["ok"] is False
    status, body, response = await fetch(session, url + "/predict", "POST")
    assert status == 503
    assert body["error"]["type"] == "not_ready"
    assert response.headers["Retry-After"].isdigit()


# -- readiness ----------------------------------------------------------------------------


async def test_traffic_waits_until_the_readiness_endpoint_passes(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = model_config(tmp_path, control, ready=False, proxy=FAST_PROBES)
    async with run_proxy(config, wait_ready=False) as proxy:
        pid = await started_pid(proxy)
        await proxy.wait_for_log(r"\[model-server stdout\] model server listening")

        status, body, _ = await fetch(session, proxy.url + "/ready")
        assert status == 503
        assert body["state"] == "starting"
        assert body["pid"] == pid
        assert body["restarts"] == 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["since"])
        status, body, _ = await fetch(session, proxy.url + "/health")
        assert (status, body["pid"]) == (200, pid)  # the process runs, ready or not
        await assert_not_ready(session, proxy.url)
        assert "the model server is ready" not in proxy.log

        (control / "ready").touch()
        line = await proxy.wait_for_log(READY)
        assert float(re.search(READY, line)[1]) > 0  # type: ignore[index]
        status, body, _ = await fetch(session, proxy.url + "/ready")
        assert (status, body["state"], body["pid"]) == (200, "ready", pid)
        status, body, _ = await fetch(session, proxy.url + "/predict", "POST")
        assert (status, body) == (200, {"pid": pid})


async def test_without_a_readiness_endpoint_ready_means_the_port_accepts(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = model_config(
        tmp_path,
        control,
        "--listen-after-file",
        readiness_endpoint=None,
        liveness_endpoint=None,
        proxy=FAST_PROBES,
    )
    async with run_proxy(config, wait_ready=False) as proxy:
        await proxy.wait_for_log(r"\[model-server stdout\] model server says hello")
        await assert_not_ready(session, proxy.url)
        (control / "listen").touch()
        await proxy.wait_for_log(READY)
        status, body, _ = await fetch(session, proxy.url + "/ready")
        assert (status, body["state"]) == (200, "ready")
        status, body, _ = await fetch(session, proxy.url + "/predict", "POST")
        assert (status, body) == (200, {"pid": body["pid"]})


async def test_failing_readiness_stops_traffic_until_it_passes_again(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = model_config(
        tmp_path,
        control,
        health_checks={"stop_traffic_threshold_seconds": 0.3},
        proxy=FAST_PROBES,
    )
    async with run_proxy(config) as proxy:
        status, _, _ = await fetch(session, proxy.url + "/predict", "POST")
        assert status == 200

        mark = len(proxy.lines)
        (control / "ready").unlink()
        await proxy.wait_for_log("failing readiness: traffic stopped", after=mark)
        await assert_not_ready(session, proxy.url)
        status, body, _ = await fetch(session, proxy.url + "/health")
        assert (status, body["state"]) == (200, "unready")  # still running: no restart

        (control / "ready").touch()
        await proxy.wait_for_log("the model server is ready again", after=mark)
        status, _, _ = await fetch(session, proxy.url + "/ready")
        assert status == 200
        status, _, _ = await fetch(session, proxy.url + "/predict", "POST")
        assert status == 200
        assert "restarting" not in proxy.log


async def test_a_child_never_ready_is_restarted_after_the_startup_threshold(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = model_config(
        tmp_path,
        control,
        "--grandchild",
        ready=False,
        # long enough for a loaded machine to start the second child ready
        health_checks={"startup_threshold_seconds": 1.0},
        proxy=FAST_PROBES,
    )
    async with run_proxy(config, wait_ready=False) as proxy:
        first = await started_pid(proxy)
        mark = len(proxy.lines)  # from here on, the first start is behind
        await proxy.wait_for_log("was not ready in time; restarting")
        assert list(group_pids(first)) == []  # the whole group went, grandchild included
        assert await restarts_metric(session, proxy.url) == 1
        status, body, _ = await fetch(session, proxy.url + "/health")
        assert (status, body["restarts"]) == (503, 1)  # none runs during the backoff

        (control / "ready").touch()  # the next child will be ready
        second = await started_pid(proxy, after=mark)
        assert second != first
        await proxy.wait_for_log(READY)
        status, body, _ = await fetch(session, proxy.url + "/ready")
        assert (status, body["pid"], body["restarts"]) == (200, second, 1)


async def test_a_child_never_ready_makes_the_proxy_exit_with_restart_policy_never(
    tmp_path: Path, control: Path
) -> None:
    config = model_config(
        tmp_path,
        control,
        ready=False,
        health_checks={"startup_threshold_seconds": 0.5},
        proxy={**FAST_PROBES, "restart_policy": "never"},
    )
    async with run_proxy(config, wait_ready=False) as proxy:
        pid = await started_pid(proxy)
        assert await proxy.exited() != 0
    assert "restart_policy is never" in proxy.log
    assert list(group_pids(pid)) == []


# -- exits and restarts -------------------------------------------------------------------


async def test_a_killed_child_flips_ready_at_once_and_is_restarted(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    async with run_proxy(model_config(tmp_path, control)) as proxy:
        status, body, _ = await fetch(session, proxy.url + "/health")
        pid = body["pid"]
        assert (status, body["restarts"]) == (200, 0)
        mark = len(proxy.lines)

        os.killpg(pid, signal.SIGKILL)
        # Loose, and without sleeping: ask until /ready says 503 (each request is one
        # loopback round trip); it flips in a few ms, the bound only has to beat the restart.
        async with asyncio.timeout(1.0):
            while (await fetch(session, proxy.url + "/ready"))[0] != 503:
                pass
        await proxy.wait_for_log(rf"\(pid {pid}\) exited with code -9", after=mark)
        await assert_not_ready(session, proxy.url)
        status, body, _ = await fetch(session, proxy.url + "/health")
        assert (status, body["pid"]) == (503, None)

        new = await started_pid(proxy, after=mark)
        await proxy.wait_for_log(READY, after=mark)
        assert new != pid
        status, body, _ = await fetch(session, proxy.url + "/health")
        assert (status, body["pid"], body["restarts"]) == (200, new, 1)
        assert await restarts_metric(session, proxy.url) == 1
        status, body, _ = await fetch(session, proxy.url + "/predict", "POST")
        assert (status, body) == (200, {"pid": new})


@pytest.mark.parametrize("code", [0, 3])
async def test_any_exit_is_unexpected_and_health_is_503_until_the_restart(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession, code: int
) -> None:
    async with run_proxy(model_config(tmp_path, control)) as proxy:
        _, body, _ = await fetch(session, proxy.url + "/health")
        pid = body["pid"]
        mark = len(proxy.lines)
        (control / f"exit-{pid}").write_text(str(code))
        await proxy.wait_for_log(rf"\(pid {pid}\) exited with code {code}$", after=mark)
        # the first requests after the exit was logged: both 503 during the backoff
        status, body, _ = await fetch(session, proxy.url + "/ready")
        assert status == 503
        status, body, _ = await fetch(session, proxy.url + "/health")
        assert (status, body["ok"], body["pid"], body["state"]) == (503, False, None, "restarting")
        await proxy.wait_for_log(r"exited; restarting in 1 s", after=mark)

        new = await started_pid(proxy, after=mark)
        await proxy.wait_for_log(READY, after=mark)
        status, body, _ = await fetch(session, proxy.url + "/ready")
        assert (status, body["pid"], body["restarts"]) == (200, new, 1)
        assert await restarts_metric(session, proxy.url) == 1


async def test_an_exit_makes_the_proxy_exit_with_restart_policy_never(
    tmp_path: Path, control: Path
) -> None:
    config = model_config(tmp_path, control, proxy={"restart_policy": "never"})
    async with run_proxy(config) as proxy:
        pid = int((control / "server.pid").read_text())
        (control / f"exit-{pid}").write_text("0")
        assert await proxy.exited() == 1
    assert "restart_policy is never: shutting down" in proxy.log
    assert "restarting" not in proxy.log


async def test_a_crash_loop_is_given_up_after_five_exits_in_a_row_never_ready(
    tmp_path: Path, control: Path
) -> None:
    # In process, so the backoff can be short: runs 1-4 and 6-10 exit at once, run 5 becomes
    # ready first; giving up at run 10 shows that readiness broke the streak.
    (control / "ready").touch()
    port = free_port()
    runs = control / "runs"
    script = tmp_path / "start.sh"
    script.write_text(
        f'n=$(($(cat {runs} 2>/dev/null || echo 0) + 1)); echo "$n" > {runs}\n'
        f'if [ "$n" -eq 5 ]; then {model_command(port, control)}; fi\n'
        "exit 3\n"
    )
    config = load_config(
        write_config(
            tmp_path,
            server_port=port,
            start_command=f"sh {script}",
            readiness_endpoint="/ready",
            liveness_endpoint=None,
            proxy=FAST_PROBES,
        )
    )
    phases: list[tuple[str, int | None]] = []
    restarts = 0
    became_ready = asyncio.Event()

    def on_phase(phase: str, pid: int | None) -> None:
        phases.append((phase, pid))
        if phase == "ready":
            became_ready.set()

    def on_restart() -> None:
        nonlocal restarts
        restarts += 1

    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    try:
        model = ModelServer(
            config,
            reaper=reaper,
            on_phase=on_phase,
            on_restart=on_restart,
            backoff=RestartBackoff(initial=0.01, maximum=0.02),
        )
        life = asyncio.create_task(model.run())
        try:
            async with asyncio.timeout(SAFETY):
                ready = asyncio.create_task(became_ready.wait())
                await asyncio.wait({ready, life}, return_when=asyncio.FIRST_COMPLETED)
                assert ready.done(), "gave up before run 5"
                pid = int((control / "server.pid").read_text())
                (control / f"exit-{pid}").write_text("0")
                code = await life
        finally:
            model.kill()
            life.cancel()
            await asyncio.gather(life, return_exceptions=True)
    finally:
        reaper.uninstall()
    assert code == 1
    started = [pid for phase, pid in phases if phase == "starting"]
    assert len(started) == len(set(started)) == 10
    assert runs.read_text().strip() == "10"
    assert restarts == 9
    assert [phase for phase, _ in phases].count("ready") == 1
    assert all(list(group_pids(pid)) == [] for pid in started)


# -- liveness -----------------------------------------------------------------------------


async def test_failing_liveness_kills_the_whole_group_and_restarts(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = model_config(
        tmp_path,
        control,
        "--grandchild",
        health_checks={"restart_threshold_seconds": 0.3},
        proxy=FAST_PROBES,
    )
    async with run_proxy(config) as proxy:
        pid = int((control / "server.pid").read_text())
        grandchild = int((control / "grandchild.pid").read_text())
        assert set(group_pids(pid)) == {pid, grandchild}
        mark = len(proxy.lines)

        (control / f"dead-{pid}").touch()  # readiness still passes
        await proxy.wait_for_log("failed its liveness probe; restarting in 1 s", after=mark)
        assert not process_alive(pid)
        assert not process_alive(grandchild)
        assert list(group_pids(pid)) == []
        await assert_not_ready(session, proxy.url)

        new = await started_pid(proxy, after=mark)
        await proxy.wait_for_log(READY, after=mark)
        status, body, _ = await fetch(session, proxy.url + "/ready")
        assert (status, body["pid"], body["restarts"]) == (200, new, 1)
        assert await restarts_metric(session, proxy.url) == 1
        assert process_alive(int((control / "grandchild.pid").read_text()))


# -- logs ---------------------------------------------------------------------------------


async def test_the_childs_output_is_in_the_log_tagged_as_the_model_servers(
    tmp_path: Path, control: Path
) -> None:
    async with run_proxy(model_config(tmp_path, control)) as proxy:
        await proxy.wait_for_log(r"^\[model-server stdout\] model server says hello on stdout$")
        await proxy.wait_for_log(r"^\[model-server stderr\] model server says hello on stderr$")


async def test_json_logs_are_one_object_per_line_child_lines_included(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = model_config(tmp_path, control, proxy={"log_format": "json"})
    async with run_proxy(config) as proxy:
        status, _, _ = await fetch(session, proxy.url + "/predict", "POST")
        assert status == 200
        await proxy.wait_for_log("model server says hello on stderr")
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited() == 0

    entries = [json.loads(line) for line in proxy.lines]  # fails on any line that is not JSON
    assert entries
    assert all(isinstance(entry, dict) for entry in entries)
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    child = {(e["stream"], e["message"]) for e in entries if e["logger"] == "model_server"}
    assert ("stdout", "model server says hello on stdout") in child
    assert ("stderr", "model server says hello on stderr") in child
    own = [entry["message"] for entry in entries if entry["logger"].startswith("model_proxy")]
    assert any(re.match(READY, message) for message in own)
    assert any(message.startswith("received SIGTERM") for message in own)
