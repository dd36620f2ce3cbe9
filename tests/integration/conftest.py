"""Real model servers, each installed from PyPI into a virtualenv of its own (they pin
versions that conflict with each other and with the proxy), cached between runs.

`server_venv(name, requirements)` builds `$MODEL_PROXY_VENVS/<name>-<hash>` (default
/tmp/model-proxy-venvs) once: the hash covers the requirements and the Python version, so a
changed pin gets a new environment and a rerun reuses the old one. A file lock keeps two
test sessions from building the same one; a build that died half-way is started again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

VENVS = Path(os.environ.get("MODEL_PROXY_VENVS", "/tmp/model-proxy-venvs"))
INSTALL_TIMEOUT = 900  # seconds: a cold MLServer install is ~40 s here, much more on a slow link
# a fixture that installs runs inside the first test that needs it: its timeout covers both
SLOW = pytest.mark.timeout(INSTALL_TIMEOUT + 120)

MLSERVER = ["mlserver==1.7.1"]
# seldon-core 1.x imports pkg_resources (through gunicorn), gone from setuptools 81 on
SELDON = ["seldon-core==1.18.2", "setuptools<81"]
ASGI = ["uvicorn==0.54.0", "starlette==1.10.0", "websockets==17.4", "prometheus-client==0.26.0"]


def server_venv(name: str, requirements: Sequence[str]) -> Path:
    """A virtualenv with `requirements` installed; its bin/ holds the server's commands."""
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:12]
    home = VENVS / f"{name}-{key}"
    marker = home / ".model-proxy-installed"
    VENVS.mkdir(parents=True, exist_ok=True)
    with (VENVS / f"{name}-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file():
            return home
        shutil.rmtree(home, ignore_errors=True)
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(home)], check=True)
        pip = [home / "bin" / "python", "-m", "pip", "install", "--quiet", *requirements]
        done = subprocess.run(pip, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        if done.returncode:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            pytest.fail(f"cannot install {' '.join(requirements)}:\n{tail}", pytrace=False)
        # kept for the curious: how long the cold install took
        marker.write_text(f"installed in {time.monotonic() - started:.1f} s\n")
    return home


def on_path(venv: Path) -> str:
    """PATH for a start_command that runs the venv's commands, as `activate` would set it."""
    return f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', os.defpath)}"


@pytest.fixture(scope="session")
def mlserver_venv() -> Path:
    return server_venv("mlserver", MLSERVER)


@pytest.fixture(scope="session")
def seldon_venv() -> Path:
    return server_venv("seldon-core", SELDON)


@pytest.fixture(scope="session")
def asgi_venv() -> Path:
    return server_venv("asgi", ASGI)
