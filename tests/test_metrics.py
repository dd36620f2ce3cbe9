"""/metrics: every family of the contract from the start, and the values a short mixed load
leaves behind, read back with the Prometheus text parser."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .conftest import fake_upstream, in_process_proxy, run_proxy, write_config

# the contract's table: name, type, label names of its samples
CONTRACT = {
    "model_proxy_requests_total": ("counter", {"route", "method", "code"}),
    "model_proxy_request_duration_seconds": ("histogram", {"route"}),
    "model_proxy_time_to_first_byte_seconds": ("histogram", {"route"}),
    "model_proxy_queue_wait_seconds": ("histogram", set()),
    "model_proxy_requests_in_flight": ("gauge", set()),
    "model_proxy_requests_queued": ("gauge", set()),
    "model_proxy_rejected_requests_total": ("counter", {"reason"}),
    "model_proxy_upstream_ready": ("gauge", set()),
    "model_proxy_upstream_restarts_total": ("counter", set()),
    "model_proxy_websocket_connections": ("gauge", set()),
    "model_proxy_websocket_messages_total": ("counter", {"direction"}),
    "model_proxy_client_disconnects_total": ("counter", {"phase"}),
    "model_proxy_concurrency_limit": ("gauge", set()),
    "model_proxy_time_to_first_event_seconds": ("histogram", {"route"}),
    "model_proxy_inter_event_seconds": ("histogram", {"route"}),
    "model_proxy_tokens_total": ("counter", {"kind"}),
    "model_proxy_upstream_metrics_up": ("gauge", set()),
    # prometheus-client's process collector, on the proxy's own registry
    "process_cpu_seconds_total": ("counter", set()),
    "process_resident_memory_bytes": ("gauge", set()),
    "process_open_fds": ("gauge", set()),
}


def sample_key(sample: Sample) -> str:
    if not sample.labels:
        return sample.name
    inner = ",".join(f'{name}="{value}"' for name, value in sorted(sample.labels.items()))
    return f"{sample.name}{{{inner}}}"


async def scrape_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text()


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Every sample of /metrics by `name{label="value",...}` (labels sorted)."""
    text = await scrape_text(session, url)
    return {
        sample_key(sample): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def metric_becomes(
    session: aiohttp.ClientSession, url: str, key: str, value: float, timeout: float = 5
) -> None:
    """Scrape until the sample `key` has `value` (each scrape is a round trip through the
    proxy's loop, so the proxy moves on between them)."""
    async with asyncio.timeout(timeout):
        while (await scrape(session, url)).get(key) != value:
            pass


def by_prefix(samples: dict[str, float], prefix: str) -> dict[str, float]:
    return {key: value for key, value in samples.items() if key.startswith(prefix)}


async def test_every_family_is_exposed_with_its_type_before_any_request(tmp_path: Path) -> None:
    async with (
        in_process_proxy(tmp_path, 9) as (_, url),  # no request reaches the model server
        aiohttp.ClientSession() as session,
    ):
        text = await scrape_text(session, url)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name, (kind, labels) in CONTRACT.items():
        assert f"# TYPE {name} {kind}\n" in text, name
        family = families[name.removesuffix("_total") if kind == "counter" else name]
        assert family.type == kind
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, sample
    samples = {
        sample_key(sample): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert samples["model_proxy_requests_in_flight"] == 0
    assert samples["model_proxy_requests_queued"] == 0
    assert samples["model_proxy_upstream_ready"] == 1
    assert samples["model_proxy_upstream_restarts_total"] == 0
    assert samples["model_proxy_websocket_connections"] == 0
    for direction in ("client_to_upstream", "upstream_to_client"):
        assert samples[f'model_proxy_websocket_messages_total{{direction="{direction}"}}'] == 0
    for phase in ("queued", "waiting", "streaming"):
        assert samples[f'model_proxy_client_disconnects_total{{phase="{phase}"}}'] == 0
    for kind in ("prompt", "completion"):
        assert samples[f'model_proxy_tokens_total{{kind="{kind}"}}'] == 0
    assert samples["model_proxy_concurrency_limit"] == 4  # write_config's predict_concurrency
    assert samples["model_proxy_upstream_metrics_up"] == 0  # none configured
    assert samples["process_resident_memory_bytes"] > 0
    for route in ("predict", "sync"):
        for histogram in (
            "request_duration",
            "time_to_first_byte",
            "time_to_first_event",
            "inter_event",
        ):
            key = f'model_proxy_{histogram}_seconds_count{{route="{route}"}}'
            assert samples[key] == 0
    assert samples["model_proxy_queue_wait_seconds_count"] == 0
    assert by_prefix(samples, "model_proxy_requests_total") == {}
    assert by_prefix(samples, "model_proxy_rejected_requests_total") == {}


class Upstream:
    """/fast answers at once, /slow waits on `gate`, /hang on `hang`; /ws echoes."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.hang = asyncio.Event()
        self.arrived = {"slow": asyncio.Event(), "hang": asyncio.Event()}
        self.app = web.Application()
        self.app.router.add_get("/ws", self.websocket)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[int]:
        """Serve on a free port; the gates open on the way out, so no handler is left."""
        async with fake_upstream(self.app) as port:
            try:
                yield port
            finally:
                self.gate.set()
                self.hang.set()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        name = request.path.strip("/")
        if name in self.arrived:
            self.arrived[name].set()
            await (self.gate if name == "slow" else self.hang).wait()
        return web.json_response({"path": request.path})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws


async def test_a_mixed_load_is_counted(tmp_path: Path) -> None:
    upstream = Upstream()
    settings = {
        "max_queue_size": 1,
        "queue_timeout_seconds": 0.3,
        "max_request_body_bytes": 1000,
    }
    async with (
        upstream.serve() as port,
        in_process_proxy(
            tmp_path, port, predict_concurrency=1, predict_endpoint="/fast", proxy=settings
        ) as (proxy, url),
        aiohttp.ClientSession() as session,
    ):

        async def status(method: str, path: str, data: bytes = b"") -> int:
            async with session.request(method, url + path, data=data) as response:
                await response.read()
                return response.status

        # answered by the model server
        assert await status("GET", "/sync/fast") == 200
        assert await status("GET", "/sync/fast?again") == 200
        assert await status("POST", "/predict", b"{}") == 200
        # rejected by the proxy itself
        assert await status("POST", "/predict", b"x" * 2000) == 413
        proxy.state.enter("starting", os.getpid())
        assert (await scrape(session, url))["model_proxy_upstream_ready"] == 0
        assert await status("GET", "/sync/fast") == 503  # not_ready
        proxy.state.enter("ready", os.getpid())
        assert (await scrape(session, url))["model_proxy_upstream_ready"] == 1

        # one request holds the only slot, one waits and times out, one finds the queue full
        holder = asyncio.create_task(status("POST", "/sync/slow"))
        async with asyncio.timeout(5):
            await upstream.arrived["slow"].wait()
        waiter = asyncio.create_task(status("GET", "/sync/fast"))
        await metric_becomes(session, url, "model_proxy_requests_queued", 1)
        assert await status("GET", "/sync/fast") == 503  # queue_full
        async with asyncio.timeout(5):
            assert await waiter == 503  # queue_timeout
        upstream.gate.set()
        async with asyncio.timeout(5):
            assert await holder == 200

        # a client that leaves while the model server works on its request
        leaving = asyncio.create_task(status("GET", "/sync/hang"))
        async with asyncio.timeout(5):
            await upstream.arrived["hang"].wait()
        leaving.cancel()
        key_499 = 'model_proxy_requests_total{code="499",method="GET",route="sync"}'
        await metric_becomes(session, url, key_499, 1)
        upstream.hang.set()

        # a WebSocket: open while counted as a connection, its messages by direction
        async with session.ws_connect(url + "/sync/ws") as ws:
            for text in ("a", "b", "c"):
                await ws.send_str(text)
                assert await ws.receive_str() == text
            assert (await scrape(session, url))["model_proxy_websocket_connections"] == 1
        async with asyncio.timeout(5):
            await proxy.no_tunnels.wait()

        # the proxy's own endpoints are never counted
        for path in ("/health", "/ready", "/metrics", "/health"):
            assert await status("GET", path) == 200
        samples = await scrape(session, url)

    assert by_prefix(samples, "model_proxy_requests_total") == {
        'model_proxy_requests_total{code="200",method="GET",route="sync"}': 2,
        'model_proxy_requests_total{code="503",method="GET",route="sync"}': 3,
        'model_proxy_requests_total{code="499",method="GET",route="sync"}': 1,
        'model_proxy_requests_total{code="101",method="GET",route="sync"}': 1,
        'model_proxy_requests_total{code="200",method="POST",route="predict"}': 1,
        'model_proxy_requests_total{code="200",method="POST",route="sync"}': 1,
        'model_proxy_requests_total{code="413",method="POST",route="predict"}': 1,
    }
    assert by_prefix(samples, "model_proxy_rejected_requests_total") == {
        f'model_proxy_rejected_requests_total{{reason="{reason}"}}': 1
        for reason in ("not_ready", "payload_too_large", "queue_full", "queue_timeout")
    }
    # every request is timed; time to first byte only where a byte was sent (not the 499)
    assert samples['model_proxy_request_duration_seconds_count{route="sync"}'] == 8
    assert samples['model_proxy_request_duration_seconds_count{route="predict"}'] == 2
    assert samples['model_proxy_time_to_first_byte_seconds_count{route="sync"}'] == 7
    assert samples['model_proxy_time_to_first_byte_seconds_count{route="predict"}'] == 2
    # admitted: the two fast GETs, the POSTs to /predict and /sync/slow, the 499, the WebSocket
    assert samples["model_proxy_queue_wait_seconds_count"] == 6
    for histogram in ("request_duration", "time_to_first_byte", "queue_wait"):
        bounds = [
            float(match[1])
            for key in samples
            if (match := re.search(r'le="([^"]+)"', key))
            if key.startswith(f"model_proxy_{histogram}_seconds_bucket")
        ]
        assert min(bounds) <= 0.001
        assert max(bound for bound in bounds if bound != float("inf")) >= 300
    assert samples["model_proxy_requests_in_flight"] == 0
    assert samples["model_proxy_requests_queued"] == 0
    assert samples["model_proxy_websocket_connections"] == 0
    assert samples['model_proxy_websocket_messages_total{direction="client_to_upstream"}'] == 3
    assert samples['model_proxy_websocket_messages_total{direction="upstream_to_client"}'] == 3


async def test_the_proxys_own_404s_are_counted_as_route_none_and_logged(tmp_path: Path) -> None:
    # /v1/... instead of /sync/v1/...: the most common first mistake must show somewhere
    async with aiohttp.ClientSession() as session, run_proxy(write_config(tmp_path)) as proxy:
        async with session.post(
            proxy.url + "/v1/chat/completions?key=secret", json={}, headers={"X-Request-ID": "r1"}
        ) as response:
            assert response.status == 404
            assert (await response.json())["error"]["type"] == "not_found"
            assert response.headers["X-Request-ID"] == "r1"
        line = await proxy.wait_for_log(r'"POST /v1/chat/completions" 404')
        samples = await scrape(session, proxy.url)

    assert line.endswith("id=r1")
    assert "secret" not in line
    assert samples['model_proxy_requests_total{code="404",method="POST",route="none"}'] == 1
    assert not any(key.startswith("model_proxy_rejected_requests_total{") for key in samples)
