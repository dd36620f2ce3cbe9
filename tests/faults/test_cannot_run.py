"""A start command that cannot run at all (a typo in the program's name, a script without its
execute bit): the shell exits 127 or 126 at once. Retrying would only repeat it, so on the
first start the proxy gives up at once, saying why; the same code from a server that ran
before is an ordinary exit, restarted. Behind the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..children import model_command
from ..conftest import ROOT, free_port, run_proxy, write_config
from . import READY, SAFETY


@pytest.mark.parametrize(
    ("command", "code", "why"),
    [
        ("no-such-model-server --port {port}", 127, "not found"),
        ("{script} --port {port}", 126, "found but not executable"),
    ],
)
def test_a_first_start_that_cannot_run_gives_up_at_once(
    tmp_path: Path, command: str, code: int, why: str
) -> None:
    script = tmp_path / "serve.sh"
    script.write_text("#!/bin/sh\necho never\n")  # and never made executable
    port = free_port()
    config = write_config(
        tmp_path, server_port=port, start_command=command.format(script=script, port=port)
    )

    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SAFETY * 3,
        check=False,
    )

    assert result.returncode == 1
    assert (
        f"the start command cannot run (exit {code}: the command was {why}; the shell's"
        " message is above): giving up"
    ) in result.stderr
    assert "[model-server stderr]" in result.stderr  # the shell's own words come first
    assert "restarting" not in result.stderr
    assert result.stderr.count("started the model server") == 1


async def test_exit_127_from_a_server_that_ran_before_is_restarted(
    tmp_path: Path, control: Path
) -> None:
    (control / "ready").touch()
    port = free_port()
    config = write_config(
        tmp_path,
        server_port=port,
        start_command=model_command(port, control),
        readiness_endpoint="/ready",
        liveness_endpoint=None,
    )
    async with run_proxy(config) as proxy:
        pid = int((control / "server.pid").read_text())
        mark = len(proxy.lines)
        (control / f"exit-{pid}").write_text("127")
        await proxy.wait_for_log("exited with code 127", after=mark)
        await proxy.wait_for_log(READY, after=mark)
    assert "cannot run" not in proxy.log
