"""The model server hangs: a request it accepts and never answers gets 504 after
request_timeout_seconds; readiness probes that hang count as failures, and traffic stops
after the stop-traffic threshold (and comes back when they pass again)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from ..conftest import run_proxy
from . import SAFETY, fault_config, samples


async def test_a_request_the_child_never_answers_is_504(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = fault_config(tmp_path, control, proxy={"request_timeout_seconds": 0.3})
    async with run_proxy(config) as proxy:
        async with asyncio.timeout(SAFETY), session.get(proxy.url + "/sync/hang") as response:
            assert response.status == 504
            assert (await response.json())["error"]["type"] == "upstream_timeout"
        await proxy.wait_for_log(r"\[model-server stdout\] hanging")
        # the proxy goes on serving, on the same child
        async with session.post(proxy.url + "/predict") as response:
            assert response.status == 200
        metrics = await samples(session, proxy.url)
        assert metrics['model_proxy_requests_total{code="504",method="GET",route="sync"}'] == 1
        assert metrics["model_proxy_upstream_restarts_total"] == 0


async def test_hanging_readiness_probes_stop_traffic_after_the_threshold(
    tmp_path: Path, control: Path, session: aiohttp.ClientSession
) -> None:
    config = fault_config(
        tmp_path,
        control,
        health_checks={"stop_traffic_threshold_seconds": 0.3},
        proxy={"probe_interval_seconds": 0.05},  # probes time out after 0.1 s
    )
    async with run_proxy(config) as proxy:
        mark = len(proxy.lines)
        (control / "hang-ready").touch()
        await proxy.wait_for_log("failing readiness: traffic stopped", after=mark)
        async with session.get(proxy.url + "/ready") as response:
            assert response.status == 503
        async with session.post(proxy.url + "/predict") as response:
            assert response.status == 503
            assert (await response.json())["error"]["type"] == "not_ready"
            assert response.headers["Retry-After"].isdigit()
        async with session.get(proxy.url + "/health") as response:
            assert (response.status, (await response.json())["state"]) == (200, "unready")

        (control / "hang-ready").unlink()
        await proxy.wait_for_log("the model server is ready again", after=mark)
        async with session.post(proxy.url + "/predict") as response:
            assert response.status == 200
        metrics = await samples(session, proxy.url)
        assert metrics["model_proxy_upstream_restarts_total"] == 0  # a hang is not a death
        assert metrics['model_proxy_rejected_requests_total{reason="not_ready"}'] == 1
