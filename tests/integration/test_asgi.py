"""uvicorn + Starlette (examples/asgi) behind the proxy: JSON through /predict, a
Server-Sent Events stream passed through as it is produced (and stopped when the client
leaves), a WebSocket bridged both ways; and as an OpenAI-compatible server, its streams
timed, its tokens counted and its own /metrics merged into the proxy's."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import ROOT, free_port, promtool_problems, run_proxy, write_config
from .conftest import SLOW, on_path

pytestmark = [pytest.mark.integration, SLOW]

EXAMPLE = ROOT / "examples" / "asgi"


def config_for(
    directory: Path, venv: Path, proxy: dict[str, Any] | None = None, **environment: str
) -> Path:
    port = free_port()
    return write_config(
        directory,
        server_port=port,
        start_command=(
            f"uvicorn app:app --app-dir {EXAMPLE} --host 127.0.0.1 --port {port}"
            " --timeout-graceful-shutdown 5"
        ),
        predict_concurrency=4,
        proxy=proxy,
        extra={
            "environment_variables": {
                "PATH": on_path(venv),
                "MODEL_NAME": "reverser",
                **environment,
            }
        },
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


FIRST_TOKEN, INTERVAL = 0.2, 0.05  # the example "model"'s prefill and per-token times
CHAT = "/sync/v1/chat/completions"


async def test_an_openai_server_is_measured_and_its_metrics_merged(
    tmp_path: Path, asgi_venv: Path
) -> None:
    config = config_for(
        tmp_path,
        asgi_venv,
        proxy={"upstream_metrics_endpoint": "/metrics"},
        FIRST_TOKEN_SECONDS=str(FIRST_TOKEN),
        TOKEN_INTERVAL_SECONDS=str(INTERVAL),
    )
    prompt = {"role": "user", "content": "one two three four five"}
    async with (
        run_proxy(config, wait_ready=False) as proxy,
        aiohttp.ClientSession() as session,
    ):
        await proxy.wait_for_log("the model server is ready", timeout=60)

        # a stream that asks for its usage: 5 tokens, the finish chunk, the usage chunk, [DONE]
        body = {"model": "m", "messages": [prompt], "stream": True}
        body["stream_options"] = {"include_usage": True}
        async with session.post(proxy.url + CHAT, json=body) as response:
            assert response.status == 200
            assert re.fullmatch(
                r"queue;dur=\d+\.\d{3}, upstream;dur=\d+\.\d{3}", response.headers["Server-Timing"]
            )
            events = (await response.read()).decode().split("\n\n")[:-1]
        assert len(events) == 8
        assert json.loads(events[-2].removeprefix("data: "))["usage"] == {
            "prompt_tokens": 5,
            "completion_tokens": 5,
            "total_tokens": 10,
        }
        await proxy.wait_for_log(
            rf'"POST {CHAT}" 200 .* queue=\d+\.\dms upstream=\d+\.\dms ttfe=\d+\.\dms events=8 '
        )

        # the JSON answer: its head comes once the whole answer is made
        body = {"model": "m", "messages": [prompt], "max_tokens": 3}
        async with session.post(proxy.url + CHAT, json=body) as response:
            assert (await response.json())["usage"]["completion_tokens"] == 3
            timing = re.fullmatch(
                r"queue;dur=(.+), upstream;dur=(.+)", response.headers["Server-Timing"]
            )
        assert timing is not None
        assert float(timing[2]) >= (FIRST_TOKEN + 2 * INTERVAL) * 1000 * 0.9

        async with session.get(proxy.url + "/metrics") as response:
            text = await response.text()

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("model_proxy_tokens_total", kind="prompt") == 5 + 5
    assert value("model_proxy_tokens_total", kind="completion") == 5 + 3
    assert value("model_proxy_time_to_first_event_seconds_count", route="sync") == 1
    assert value("model_proxy_time_to_first_event_seconds_sum", route="sync") >= FIRST_TOKEN
    first_bucket = {"route": "sync", "le": "0.1"}
    assert value("model_proxy_time_to_first_event_seconds_bucket", **first_bucket) == 0
    assert value("model_proxy_inter_event_seconds_count", route="sync") == 7
    # the four gaps between tokens are the model's; the last chunks follow at once
    assert value("model_proxy_inter_event_seconds_sum", route="sync") >= 4 * INTERVAL
    assert value("model_proxy_concurrency_limit") == 4
    assert value("model_proxy_upstream_metrics_up") == 1
    assert value("process_resident_memory_bytes") > 0
    # the model server's own families, appended: its counter, its Python collectors; its
    # process_* are dropped for the proxy's
    assert value("asgi_demo_completion_tokens_total") == 5 + 3
    assert any(name == "python_info" for name, _ in samples)
    assert text.count("# TYPE process_cpu_seconds_total counter\n") == 1
    problems = await promtool_problems(text)
    assert problems in ([], None), problems
