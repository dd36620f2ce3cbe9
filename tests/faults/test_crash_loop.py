"""A model server that dies at every start: the restart delay doubles up to its cap, and the
proxy gives up after 5 exits in a row without becoming ready (the contract's rule).

In process, with the real lifecycle and real children, so the delays can be milliseconds.
That readiness breaks the streak is tests/test_lifecycle.py,
test_a_crash_loop_is_given_up_after_five_exits_in_a_row_never_ready; the delays' arithmetic
is tests/test_supervisor.py, test_backoff_doubles_up_to_the_maximum_and_resets.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.lifecycle import ModelServer
from proxy.supervisor import Reaper, RestartBackoff

from ..children import model_command
from ..conftest import free_port, group_pids, write_config
from . import SAFETY


async def test_a_crash_loop_backs_off_doubling_to_the_cap_then_gives_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_config(
        write_config(
            tmp_path,
            server_port=free_port(),
            start_command="echo starting; exit 3",
            readiness_endpoint=None,
            liveness_endpoint=None,
        )
    )
    started: list[int] = []
    restarts = 0

    def on_phase(phase: str, pid: int | None) -> None:
        if phase == "starting" and pid is not None:
            started.append(pid)

    def on_restart() -> None:
        nonlocal restarts
        restarts += 1

    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    caplog.set_level(logging.INFO, logger="model_proxy")
    try:
        model = ModelServer(
            config,
            reaper=reaper,
            on_phase=on_phase,
            on_restart=on_restart,
            backoff=RestartBackoff(initial=0.01, maximum=0.04, give_up_after=5),
        )
        try:
            async with asyncio.timeout(SAFETY):
                code = await model.run()
        finally:
            model.kill()
    finally:
        reaper.uninstall()

    assert code == 1
    messages = [record.getMessage() for record in caplog.records]
    delays = [float(m[1]) for m in map(re.compile(r"restarting in (\S+) s").search, messages) if m]
    assert delays == [0.01, 0.02, 0.04, 0.04]  # doubling, then capped
    assert any("exited 5 times in a row without becoming ready: giving up" in m for m in messages)
    assert restarts == 4
    assert len(started) == len(set(started)) == 5
    assert all(list(group_pids(pid)) == [] for pid in started)


@pytest.mark.parametrize(
    ("reset_after", "expected"),
    [
        (60.0, [0.01, 0.02, 0.04]),  # ready for less than a minute each time: no fresh start
        (0.0, [0.01, 0.01, 0.01]),  # ready long enough each time: every delay the first
    ],
)
async def test_the_delay_starts_afresh_only_after_the_child_stayed_ready_long_enough(
    tmp_path: Path, control: Path, caplog: pytest.LogCaptureFixture, reset_after: float,
    expected: list[float],
) -> None:  # fmt: skip
    # a server that becomes ready and then dies, over and over: readiness alone must not
    # bring the shortest delay back, or it restarts in a tight loop forever
    (control / "ready").touch()
    port = free_port()
    config = load_config(
        write_config(
            tmp_path,
            server_port=port,
            start_command=model_command(port, control),
            readiness_endpoint="/ready",
            liveness_endpoint=None,
        )
    )
    readies: asyncio.Queue[int] = asyncio.Queue()

    def on_phase(phase: str, pid: int | None) -> None:
        if phase == "ready" and pid is not None:
            readies.put_nowait(pid)

    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    caplog.set_level(logging.INFO, logger="model_proxy")
    try:
        model = ModelServer(
            config,
            reaper=reaper,
            on_phase=on_phase,
            on_restart=lambda: None,
            backoff=RestartBackoff(initial=0.01, maximum=0.04, reset_after=reset_after),
        )
        life = asyncio.create_task(model.run())
        try:
            async with asyncio.timeout(SAFETY):
                for _ in range(len(expected) + 1):
                    (control / f"exit-{await readies.get()}").write_text("3")
        finally:
            model.kill()
            life.cancel()
            await asyncio.gather(life, return_exceptions=True)
            if model.child is not None:  # its output, read to the end before the loop goes
                async with asyncio.timeout(SAFETY):
                    await model.child.wait_group_gone()
                    await model.child.output_closed()
    finally:
        reaper.uninstall()
    messages = [record.getMessage() for record in caplog.records]
    delays = [float(m[1]) for m in map(re.compile(r"restarting in (\S+) s").search, messages) if m]
    assert delays[: len(expected)] == expected
