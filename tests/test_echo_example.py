"""The echo example as its README runs it: its WebSocket demo client needs nothing beyond
model-proxy's own dependencies (aiohttp), and talks through the proxy."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from .conftest import ROOT, run_proxy, write_config

CLIENT = ROOT / "examples" / "echo" / "ws_client.py"
# the client as a user without the test extras runs it: `websockets` cannot be imported
WITHOUT_WEBSOCKETS = (
    "import runpy, sys; sys.modules['websockets'] = None; sys.argv = sys.argv[1:];"
    " runpy.run_path(sys.argv[0], run_name='__main__')"
)


async def test_the_websocket_demo_client_echoes_lines_through_the_proxy(tmp_path: Path) -> None:
    async with run_proxy(write_config(tmp_path)) as proxy:
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WITHOUT_WEBSOCKETS,
            str(CLIENT),
            "ws" + proxy.url.removeprefix("http") + "/sync/ws",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert client.stdin is not None
        assert client.stdout is not None
        async with asyncio.timeout(20):
            client.stdin.write(b"hello\n")
            assert await client.stdout.readline() == b"< hello\n"
            client.stdin.write(b"close:4000:done\n")  # the echo server closes with 4000
            out, err = await client.communicate()

    assert client.returncode == 0, err
    assert out == b""
    assert err.decode().splitlines()[-1] == "closed with code 4000"
