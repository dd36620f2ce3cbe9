"""docker_server.run_as_user_id behind the real CLI: the model server runs as that user, with
the groups `docker run --user` would give it; a proxy that is not root says it cannot switch
and exits 1 before starting anything. The tests run as root (they skip otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, free_port, run_proxy, write_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")

IDENTITY = r"\[model-server stdout\] uid=(\d+) gid=(\d+) groups=(.*)$"


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


@pytest.mark.parametrize(
    ("uid", "gid", "groups"),
    [
        (65534, 65534, "65534"),  # nobody: its group and groups from /etc/passwd, /etc/group
        (4242, 0, ""),  # in no /etc/passwd: group 0 and no others, as docker run --user 4242
    ],
)
async def test_the_model_server_runs_as_run_as_user_id(
    tmp_path: Path, uid: int, gid: int, groups: str
) -> None:
    # the child says who it is, then stays (sh, id and sleep: what any user may run here)
    config = write_config(
        tmp_path,
        start_command='echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"; exec sleep 1000',
        readiness_endpoint=None,
        liveness_endpoint=None,
    )
    data = yaml.safe_load(config.read_text())
    data["docker_server"]["run_as_user_id"] = uid
    config.write_text(yaml.safe_dump(data))

    async with run_proxy(config, wait_ready=False) as proxy:
        line = await proxy.wait_for_log(IDENTITY)
        started = await proxy.wait_for_log(r"started the model server \(pid (\d+)\)")
        pid = int(started.split("(pid ")[1].split(")")[0])
        status = proc_status(pid)  # the shell exec'd sleep: the same process, still the child

    assert line.endswith(f"uid={uid} gid={gid} groups={groups or gid}")
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["Gid"].split() == [str(gid)] * 4
    assert status["Groups"] == groups


def test_a_proxy_that_is_not_root_cannot_switch_and_says_so(tmp_path: Path) -> None:
    marker = Path(tempfile.mkdtemp(prefix="model-proxy-run-as-"))
    try:
        # a folder the unprivileged proxy can read (tmp_path's parents are root's alone)
        marker.chmod(0o755)
        config = write_config(
            marker,
            server_port=free_port(),
            start_command=f"touch {marker}/started",
            readiness_endpoint=None,
            liveness_endpoint=None,
        )
        data = yaml.safe_load(config.read_text())
        data["docker_server"]["run_as_user_id"] = 1000
        config.write_text(yaml.safe_dump(data))
        config.chmod(0o644)
        # the real CLI, as user nobody: privileges are dropped once everything is imported,
        # because the interpreter itself lives where only root may read
        drop_then_run = (
            "import encodings.idna, os, sys\n"
            "from proxy.cli import main\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "raise SystemExit(main(['run', '--config', sys.argv[1]]))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", drop_then_run, str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        started = (marker / "started").exists()
    finally:
        shutil.rmtree(marker)

    assert result.returncode == 1, result.stderr
    assert (
        "docker_server.run_as_user_id is 1000, but the proxy runs as uid 65534 and only root"
        " can start a process as another user: run the proxy as root" in result.stderr
    )
    assert not started
