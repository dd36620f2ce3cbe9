"""A start command that forks (`sh -c "a & b"`) leaves neither an orphan nor a zombie behind,
after a restart or a shutdown: the whole group is stopped, and as a child subreaper (what
a PID 1 must be) the proxy reaps the grandchildren that were reparented to it.

tests/test_shutdown.py checks the same group is stopped (`a & b & wait`, the shell staying);
here the shell goes away with the server and every process must be gone from /proc, which
a zombie is not.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from ..children import fetch, model_config
from ..conftest import group_pids, run_proxy
from . import READY


def stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of `pid`; None once it is gone (reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1])


def zombies_of(parent: int) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and stat(int(entry.name)) == ("Z", parent):
            yield int(entry.name)


async def test_a_forking_start_command_leaves_no_orphan_or_zombie(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    config = model_config(
        tmp_path,
        control,
        command="sleep 1000 & {model}",  # the shell may exec the server: no `wait` keeps it
        proxy={"probe_interval_seconds": 0.05},
    )
    async with aiohttp.ClientSession() as session, run_proxy(config) as proxy:
        _, body, _ = await fetch(session, proxy.url + "/health")
        first = set(group_pids(body["pid"]))
        server = int((control / "server.pid").read_text())
        assert server in first
        assert len(first) >= 2  # the server and the sleep (and the shell, if it stayed)
        mark = len(proxy.lines)

        (control / f"exit-{server}").write_text("0")  # the sleep is orphaned, still running
        await proxy.wait_for_log("restarting in", after=mark)
        assert [pid for pid in first if stat(pid) is not None] == []  # killed and reaped
        assert list(zombies_of(proxy.process.pid)) == []
        await proxy.wait_for_log(READY, after=mark)

        _, body, _ = await fetch(session, proxy.url + "/health")
        second = set(group_pids(body["pid"]))
        assert len(second) >= 2
        assert not second & first
        mark = len(proxy.lines)
        proxy.signal(signal.SIGTERM)
        await proxy.wait_for_log("drained in", after=mark)  # the group is gone by then
        assert [pid for pid in second if stat(pid) is not None] == []
        assert list(zombies_of(proxy.process.pid)) == []
        assert await proxy.exited() == 0
