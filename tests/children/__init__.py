"""Child processes the lifecycle tests run as the model server, and helpers to drive them."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path
from typing import Any

import aiohttp

from ..conftest import free_port, write_config

MODEL = Path(__file__).resolve().with_name("model.py")
SAFETY = 10  # seconds; a safety net only


def model_command(port: int, control: Path, *flags: str, exec_: bool = True) -> str:
    """The start_command running tests/children/model.py, controlled through `control`.
    With `exec_` the shell becomes the server, so the proxy's child pid is the server's."""
    words = [sys.executable, str(MODEL), "--port", str(port), "--dir", str(control), *flags]
    return ("exec " if exec_ else "") + shlex.join(words)


def model_config(
    tmp_path: Path,
    control: Path,
    *flags: str,
    ready: bool = True,
    readiness_endpoint: str | None = "/ready",
    liveness_endpoint: str | None = "/live",
    command: str | None = None,
    **settings: Any,
) -> Path:
    """A config running tests/children/model.py (`command` is a start_command template with
    `{model}` for it); `ready` creates the child's readiness file now."""
    if ready:
        (control / "ready").touch()
    port = free_port()
    model = model_command(port, control, *flags, exec_=command is None)
    return write_config(
        tmp_path,
        server_port=port,
        start_command=command.format(model=model) if command else model,
        readiness_endpoint=readiness_endpoint,
        liveness_endpoint=liveness_endpoint,
        **settings,
    )


async def fetch(
    session: aiohttp.ClientSession, url: str, method: str = "GET"
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """Status, JSON body and the response of one request."""
    async with asyncio.timeout(SAFETY), session.request(method, url) as response:
        return response.status, await response.json(), response
