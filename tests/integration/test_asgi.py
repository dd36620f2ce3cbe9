"""uvicorn + Starlette (examples/asgi) behind the proxy: JSON through /predict, a
Server-Sent Events stream passed through as it is produced (and stopped when the client
leaves), and a WebSocket bridged both ways."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from ..conftest import ROOT, free_port, run_proxy, write_config
from .conftest import SLOW, on_path

pytestmark = [pytest.mark.integration, SLOW]

EXAMPLE = ROOT / "examples" / "asgi"


def config_for(directory: Path, venv: Path) -> Path:
    port = free_port()
    return write_config(
        directory,
        server_port=port,
        start_command=(
            f"uvicorn app:app --app-dir {EXAMPLE} --host 127.0.0.1 --port {port}"
            " --timeout-graceful-shutdown 5"
        ),
        predict_concurrency=4,
        extra={"environment_variables": {"PATH": on_path(venv), "MODEL_NAME": "reverser"}},
    )


async def test_json_sse_and_websocket_through_the_proxy(tmp_path: Path, asgi_venv: Path) -> None:
    async with (
        run_proxy(config_for(tmp_path, asgi_venv), wait_ready=False) as proxy,
        aiohttp.ClientSession() as session,
    ):
        await proxy.wait_for_log("the model server is ready", timeout=60)

        async with session.post(proxy.url + "/predict", json={"prompt": "a b c"}) as response:
            assert response.status == 200
            assert await response.json() == {"model": "reverser", "completion": "c b a"}

        # 1000 tokens 50 ms apart would take 50 s: the first three can only be here within
        # the safety net if each is passed on as the server produces it
        stream = proxy.url + "/sync/generate?n=1000&interval=0.05"
        async with session.get(stream, timeout=aiohttp.ClientTimeout(total=20)) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            tokens = []
            async for line in response.content:
                if line.startswith(b"data: "):
                    tokens.append(json.loads(line.removeprefix(b"data: "))["token"])
                if len(tokens) == 3:
                    break
        assert tokens == [0, 1, 2]
        # leaving early reached uvicorn: the generation stopped, as an LLM's should
        await proxy.wait_for_log(r"generation cancelled after \d+ tokens", timeout=20)

        async with session.ws_connect(proxy.url + "/sync/ws") as websocket:
            await websocket.send_str("hello")
            assert await websocket.receive_str() == "echo: hello"
            await websocket.send_bytes(b"\x00\x01\x02")
            assert await websocket.receive_bytes() == b"\x02\x01\x00"
            async with session.get(proxy.url + "/metrics") as response:
                assert "model_proxy_websocket_connections 1.0" in await response.text()
        assert websocket.closed

        async with session.get(proxy.url + "/metrics") as response:
            metrics = await response.text()
        assert 'model_proxy_websocket_messages_total{direction="client_to_upstream"} 2.0' in metrics
        assert 'model_proxy_websocket_messages_total{direction="upstream_to_client"} 2.0' in metrics
