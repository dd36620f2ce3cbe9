"""A model server slow to start (a model loading its weights: tens of seconds in production,
about a second here) gets no traffic until it is ready, and is not restarted for being slow.

A child that never becomes ready is restarted after startup_threshold_seconds (or the proxy
exits, with restart_policy never): tests/test_lifecycle.py,
test_a_child_never_ready_is_restarted_after_the_startup_threshold and
test_a_child_never_ready_makes_the_proxy_exit_with_restart_policy_never.
"""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from ..children import fetch
from ..conftest import echo_command, free_port, run_proxy, write_config
from . import READY, samples

LOAD_SECONDS = 1.5


async def test_a_slow_starting_child_gets_traffic_once_ready_and_is_not_restarted(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        server_port=port,
        start_command=echo_command(port, "--load-seconds", str(LOAD_SECONDS)),
        health_checks={"startup_threshold_seconds": 20},
    )
    async with (
        aiohttp.ClientSession() as session,
        run_proxy(config, wait_ready=False) as proxy,
    ):
        # the child listens at once and answers /health 503 while it loads
        await proxy.wait_for_log(r"\[model-server stdout\] echo server listening")
        status, body, _ = await fetch(session, proxy.url + "/ready")
        assert (status, body["state"]) == (503, "starting")
        status, body, _ = await fetch(session, proxy.url + "/health")
        assert status == 200  # it runs
        status, body, response = await fetch(session, proxy.url + "/predict", "POST")
        assert (status, body["error"]["type"]) == (503, "not_ready")
        assert response.headers["Retry-After"].isdigit()

        await proxy.wait_for_log(r"echo model loaded after 1\.5s")
        line = await proxy.wait_for_log(READY)
        took = float(re.search(r"after (\d+\.\d+) s", line)[1])  # type: ignore[index]
        assert took >= LOAD_SECONDS  # not declared ready before the model said so

        async with session.post(proxy.url + "/predict", json={"x": 1}) as answer:
            assert answer.status == 200
            assert await answer.json() == {"echo": {"x": 1}, "model": "echo"}
        metrics = await samples(session, proxy.url)
        assert metrics["model_proxy_upstream_restarts_total"] == 0
    assert "restarting" not in proxy.log
