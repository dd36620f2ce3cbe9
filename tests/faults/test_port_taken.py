"""Another process already listens on server_port (a stale server, a second proxy): the
proxy never forwards there. At the first start it exits 1 at once, naming the port, without
starting its child; on a restart it waits up to child_stop_grace_seconds for the port to
free, then goes on, or exits 1 the same way. Behind the real CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from ..children import fetch
from ..conftest import ROOT, echo_command, free_port, run_proxy, write_config
from . import READY, SAFETY, STARTED, pid_in


def listening(port: int) -> socket.socket:
    """A server of someone else's on 127.0.0.1:`port`: it accepts, and answers nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_a_port_already_taken_at_the_start_exits_1_without_starting_the_child(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "started"
    port = free_port()
    config = write_config(
        tmp_path, server_port=port, start_command=f"touch {marker}", readiness_endpoint=None
    )
    with listening(port):
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=SAFETY * 3,
            check=False,
        )

    assert result.returncode == 1
    assert f"127.0.0.1:{port} (docker_server.server_port) already accepts connections" in (
        result.stderr
    )
    assert not marker.exists()
    # the other server answered the TCP probe it would have used: never taken for the child
    assert "ready after" not in result.stderr
    assert "started the model server" not in result.stderr


async def test_on_a_restart_the_proxy_waits_for_the_port_to_free(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        server_port=port,
        start_command="exec " + echo_command(port),
        proxy={"child_stop_grace_seconds": SAFETY},
    )
    async with aiohttp.ClientSession() as session, run_proxy(config) as proxy:
        first = pid_in(await proxy.wait_for_log(STARTED))
        os.kill(first, signal.SIGKILL)
        mark = len(proxy.lines)
        await proxy.wait_for_log("restarting in 1 s", after=mark)
        # in the second of backoff, someone else takes the port
        with listening(port):
            await proxy.wait_for_log(
                rf"waiting up to {SAFETY} s for 127\.0\.0\.1:{port}", after=mark
            )
        second = pid_in(await proxy.wait_for_log(STARTED, after=mark))
        await proxy.wait_for_log(READY, after=mark)
        status, body, _ = await fetch(session, proxy.url + "/ready")
        assert (status, body["pid"]) == (200, second)
    assert second != first


async def test_on_a_restart_a_port_that_stays_taken_exits_1(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        server_port=port,
        start_command="exec " + echo_command(port),
        proxy={"child_stop_grace_seconds": 0.2},
    )
    async with run_proxy(config) as proxy:
        os.kill(pid_in(await proxy.wait_for_log(STARTED)), signal.SIGKILL)
        mark = len(proxy.lines)
        await proxy.wait_for_log("restarting in 1 s", after=mark)
        with listening(port):
            assert await proxy.exited() == 1
    assert len([line for line in proxy.lines if "started the model server" in line]) == 1
    assert f"127.0.0.1:{port} (docker_server.server_port) already accepts connections:" in (
        proxy.log
    )
    assert "0.2 s after the model server stopped" in proxy.log
