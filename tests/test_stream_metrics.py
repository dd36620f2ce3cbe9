"""An OpenAI-compatible model server behind the proxy: its streams' events timed as they
pass, the tokens of its `usage` objects counted, Server-Timing on its answers, and the
access log's queue, upstream, first-event and event-count figures."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from .conftest import fake_upstream, in_process_proxy
from .test_metrics import scrape

SERVER_TIMING = re.compile(r"queue;dur=(\d+\.\d{3}), upstream;dur=(\d+\.\d{3})")


class OpenAI:
    """/v1/chat/completions as vLLM answers it: JSON, or chat.completion.chunk events (a
    last one with `usage` when `stream_options.include_usage` asks), then `[DONE]`. A
    stream whose prompt is "wait" holds its second event until `gate` is set."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.completions)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["messages"][-1]["content"]
        usage = {
            "prompt_tokens": len(prompt.split()),
            "completion_tokens": body["max_tokens"],
            "total_tokens": len(prompt.split()) + body["max_tokens"],
        }
        if not body.get("stream"):
            message = {"role": "assistant", "content": " ".join(["tok"] * body["max_tokens"])}
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "length"}],
                    "usage": usage,
                }
            )
        include_usage = body.get("stream_options", {}).get("include_usage", False)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(body["max_tokens"]):
            if i == 1 and prompt == "wait":
                await self.gate.wait()
            delta = {"index": 0, "delta": {"content": "tok"}, "finish_reason": None}
            chunk: dict[str, Any] = {"object": "chat.completion.chunk", "choices": [delta]}
            if include_usage:
                chunk["usage"] = None
            await response.write(b"data: %s\n\n" % json.dumps(chunk).encode())
        if include_usage:
            last = {"object": "chat.completion.chunk", "choices": [], "usage": usage}
            await response.write(b"data: %s\n\n" % json.dumps(last).encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def request(prompt: str, tokens: int, *, stream: bool, usage: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
        "stream": stream,
    }
    if stream and usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def test_streams_and_usage_are_measured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = OpenAI()
    async with (
        fake_upstream(server.app) as port,
        in_process_proxy(
            tmp_path, port, predict_endpoint="/v1/chat/completions", proxy={"log_format": "json"}
        ) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):

        async def complete(path: str, body: dict[str, Any]) -> tuple[bytes, str]:
            async with session.post(url + path, json=body) as response:
                assert response.status == 200
                return await response.read(), response.headers["Server-Timing"]

        # 4 tokens, the usage chunk and [DONE]: 6 events; 3 prompt and 4 completion tokens
        streamed, timing = await complete("/predict", request("one two three", 4, stream=True))
        assert streamed.count(b"data: ") == 6
        assert SERVER_TIMING.fullmatch(timing)
        # without include_usage: 3 tokens and [DONE], no tokens counted
        await complete("/sync/v1/chat/completions", request("a b", 3, stream=True, usage=False))
        # a JSON answer: 5 prompt and 7 completion tokens
        answer, timing = await complete("/predict", request("1 2 3 4 5", 7, stream=False))
        assert json.loads(answer)["usage"]["completion_tokens"] == 7
        assert SERVER_TIMING.fullmatch(timing)

        samples = await scrape(session, url)
        assert proxy.access_log is not None
        with caplog.at_level(logging.INFO, logger="model_proxy.access"):
            proxy.access_log.flush()

    assert samples['model_proxy_tokens_total{kind="prompt"}'] == 3 + 5
    assert samples['model_proxy_tokens_total{kind="completion"}'] == 4 + 7
    assert samples['model_proxy_time_to_first_event_seconds_count{route="predict"}'] == 1
    assert samples['model_proxy_time_to_first_event_seconds_count{route="sync"}'] == 1
    assert samples['model_proxy_inter_event_seconds_count{route="predict"}'] == 5
    assert samples['model_proxy_inter_event_seconds_count{route="sync"}'] == 3
    assert samples['model_proxy_time_to_first_event_seconds_sum{route="predict"}'] > 0
    # gap buckets: from 1 ms, up to at least 300 s
    bounds = [
        float(match[1])
        for key in samples
        if key.startswith("model_proxy_inter_event_seconds_bucket")
        if (match := re.search(r'le="([^"+]+)"', key))
    ]
    assert min(bounds) == 0.001
    assert max(bounds) >= 300

    lines = [json.loads(line) for record in caplog.records for line in record.message.splitlines()]
    assert [(line["path"], line.get("events")) for line in lines] == [
        ("/predict", 6),
        ("/sync/v1/chat/completions", 4),
        ("/predict", None),  # not a stream
    ]
    for line in lines:
        assert 0 <= line["queue_ms"] <= line["duration_ms"]
        assert 0 <= line["upstream_ms"] <= line["duration_ms"]
    for line in lines[:2]:
        assert line["ttfb_ms"] <= line["ttfe_ms"] <= line["duration_ms"]


async def test_the_first_event_is_counted_when_it_passes(tmp_path: Path) -> None:
    """Not when the stream ends: the second event waits on the test, the first is in."""
    server = OpenAI()
    async with (
        fake_upstream(server.app) as port,
        in_process_proxy(tmp_path, port, predict_endpoint="/v1/chat/completions") as (_, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.post(url + "/predict", json=request("wait", 3, stream=True)) as stream:
            first = await stream.content.readuntil(b"\n\n")
            assert first.startswith(b"data: ")
            during = await scrape(session, url)
            server.gate.set()
            await stream.read()
        after = await scrape(session, url)

    assert during['model_proxy_time_to_first_event_seconds_count{route="predict"}'] == 1
    assert during['model_proxy_inter_event_seconds_count{route="predict"}'] == 0
    assert during['model_proxy_tokens_total{kind="completion"}'] == 0
    # the second event waited on the test: its gap is in too
    assert after['model_proxy_inter_event_seconds_count{route="predict"}'] == 4
    assert after['model_proxy_inter_event_seconds_sum{route="predict"}'] > 0
    assert after['model_proxy_tokens_total{kind="completion"}'] == 3
