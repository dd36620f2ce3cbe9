"""The model server's own /metrics in the proxy's: appended unchanged but for the families
whose names the proxy uses, valid for Prometheus' parser and promtool, never delaying a
scrape past the fetch timeout, one fetch shared by the scrapes that arrive meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import Proxy
from proxy.upstream_metrics import FETCH_TIMEOUT, child_families, exposed_names

from .conftest import fake_upstream, free_port, in_process_proxy, promtool_problems

# vLLM's metrics as its /metrics serves them (prometheus-client's exposition), abridged
VLLM_FAMILIES = """\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 2.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 0.7
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 10.0
untyped_thing{a="b"} 1
"""
# families whose names the proxy exposes itself: dropped from the merge
PROCESS = """\
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
"""
PROXYS = """\
# HELP model_proxy_requests A counter the proxy has too.
# TYPE model_proxy_requests counter
model_proxy_requests_total{route="x"} 5.0
"""
CHILD = PROCESS + VLLM_FAMILIES + PROXYS


class Child:
    """A model server's /metrics: `body` at once, or held until `release` is set."""

    def __init__(self, body: str = CHILD, *, status: int = 200, hold: bool = False) -> None:
        self.body, self.status = body, status
        self.calls = 0
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.content_type = "text/plain; version=0.0.4; charset=utf-8"
        self.app = web.Application()
        self.app.router.add_get("/metrics", self.metrics)

    async def metrics(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.arrived.set()
        await self.release.wait()
        return web.Response(
            status=self.status, body=self.body.encode(), headers={"Content-Type": self.content_type}
        )


@asynccontextmanager
async def proxy_merging(tmp_path: Path, child: Child) -> AsyncIterator[tuple[Proxy, str]]:
    async with (
        fake_upstream(child.app) as port,
        in_process_proxy(
            tmp_path, port, proxy={"upstream_metrics_endpoint": "/metrics"}
        ) as proxied,
    ):
        try:
            yield proxied
        finally:
            child.release.set()  # no handler is left waiting


async def scrape(url: str) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await response.text()


def samples(text: str) -> dict[str, float]:
    """Every sample by name and labels; the parser raises on anything malformed."""
    return {
        f"{sample.name}{sorted(sample.labels.items())}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_the_model_servers_families_are_appended_unchanged(tmp_path: Path) -> None:
    child = Child()
    async with proxy_merging(tmp_path, child) as (proxy, url):
        own = proxy.metrics.render().decode()
        text = await scrape(url)

    assert text.startswith("# HELP model_proxy_requests_total ")  # the proxy's first
    merged = text[len(text) - len(VLLM_FAMILIES) :]
    assert merged == VLLM_FAMILIES  # byte for byte, in their order
    found = samples(text)
    assert found["model_proxy_upstream_metrics_up[]"] == 1
    assert found["vllm:kv_cache_usage_perc[('engine', '0'), ('model_name', 'm')]"] == 0.25
    # the child's process_* and model_proxy_* are dropped: the proxy's own are there, once
    assert text.count("# TYPE process_cpu_seconds_total counter\n") == 1
    assert "12.5" not in text
    assert 'route="x"' not in text
    assert set(exposed_names(text)) == set(exposed_names(own)) | set(exposed_names(VLLM_FAMILIES))
    problems = await promtool_problems(text)
    if problems is not None:
        # what promtool says is about the child's names only (vLLM's colons)
        assert problems, "promtool finds vLLM's colons: a check that could not fail otherwise"
        assert {line.split()[0] for line in problems} <= exposed_names(VLLM_FAMILIES), problems


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param({"status": 500}, id="status 500"),
        pytest.param({"body": "vllm:num_requests_waiting one\n"}, id="malformed"),
        pytest.param({"status": 404}, id="no such endpoint"),
    ],
)
async def test_metrics_that_cannot_be_merged_leave_the_proxys_own(
    tmp_path: Path, answer: dict[str, Any]
) -> None:
    child = Child(**answer)
    async with proxy_merging(tmp_path, child) as (proxy, url):
        text = await scrape(url)
        own = proxy.metrics.render().decode()

    assert child.calls == 1
    assert samples(text)["model_proxy_upstream_metrics_up[]"] == 0
    assert exposed_names(text) == exposed_names(own)  # nothing of the child's
    assert await promtool_problems(text) in ([], None)


async def test_a_model_server_that_is_not_there_leaves_the_proxys_own(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    settings = {"upstream_metrics_endpoint": "/metrics", "upstream_metrics_port": port}
    async with in_process_proxy(tmp_path, port, proxy=settings) as (_, url):
        text = await scrape(url)

    assert samples(text)["model_proxy_upstream_metrics_up[]"] == 0


async def test_a_hanging_model_server_delays_no_scrape_past_the_timeout(tmp_path: Path) -> None:
    """Five scrapes at once while the model server never answers: one fetch, shared; all
    five answered at its timeout with the proxy's own metrics. Then it answers again."""
    child = Child(hold=True)
    loop = asyncio.get_running_loop()
    async with proxy_merging(tmp_path, child) as (_, url):

        async def timed_scrape() -> tuple[float, str]:
            started = loop.time()
            text = await scrape(url)
            return loop.time() - started, text

        async with asyncio.timeout(FETCH_TIMEOUT + 5):  # a safety net
            answers = await asyncio.gather(*(timed_scrape() for _ in range(5)))
        assert not child.release.is_set()  # it still hangs: the timeout answered them

        assert child.calls == 1
        for elapsed, text in answers:
            assert samples(text)["model_proxy_upstream_metrics_up[]"] == 0
            assert elapsed < FETCH_TIMEOUT + 0.5  # at the timeout, not later

        child.release.set()
        text = await scrape(url)
        assert child.calls == 2  # a new scrape, a new fetch
        assert samples(text)["model_proxy_upstream_metrics_up[]"] == 1


async def test_an_openmetrics_answer_is_merged_in_the_text_format(tmp_path: Path) -> None:
    child = Child(
        body=(
            "# TYPE requests counter\n"
            "# HELP requests Requests served.\n"
            'requests_total{path="/v1"} 7.0\n'
            "# EOF\n"
        )
    )
    child.content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    async with proxy_merging(tmp_path, child) as (_, url):
        text = await scrape(url)

    assert "# EOF" not in text
    assert "# TYPE requests_total counter\n" in text
    assert samples(text)["requests_total[('path', '/v1')]"] == 7
    assert samples(text)["model_proxy_upstream_metrics_up[]"] == 1


async def test_head_and_the_api_key_apply_as_without_merging(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("secret\n")
    child = Child()
    settings = {
        "upstream_metrics_endpoint": "/metrics",
        "api_key_secret": "key",
        "metrics_require_api_key": True,
    }
    async with (
        fake_upstream(child.app) as port,
        in_process_proxy(tmp_path, port, proxy=settings) as (_, url),
        aiohttp.ClientSession() as session,
    ):
        async with session.get(url + "/metrics") as response:
            assert response.status == 401
        headers = {"Authorization": "Bearer secret"}
        async with session.head(url + "/metrics", headers=headers) as response:
            assert response.status == 200
            assert int(response.headers["Content-Length"]) > len(VLLM_FAMILIES)
            assert await response.read() == b""
        # the same connection goes on: the answer was framed as it said
        async with session.get(url + "/metrics", headers=headers) as response:
            assert "vllm:num_requests_waiting" in await response.text()
    assert child.calls == 2


def test_families_are_dropped_whole_and_the_rest_kept_as_written() -> None:
    text = (
        "# a comment before any family\n"
        "# HELP shared_seconds The proxy has this one.\n"
        "# TYPE shared_seconds histogram\n"
        'shared_seconds_bucket{le="+Inf"} 1\n'
        "shared_seconds_sum 0.5\n"
        "shared_seconds_count 1\n"
        "\n"
        "# TYPE mine counter\n"
        "mine_total 3\n"
        "mine_created 1.7e9\n"
        "bare 1 1700000000000\n"
        "bare 2\n"
    )
    reserved = frozenset({"shared_seconds_count"})

    assert child_families(text, reserved).decode() == (
        "# a comment before any family\n"
        "# TYPE mine counter\n"
        "mine_total 3\n"
        "mine_created 1.7e9\n"
        "bare 1 1700000000000\n"
        "bare 2\n"
    )
    with pytest.raises(ValueError, match="Invalid"):
        child_families("mine_total{a=b} 1\n", reserved)
