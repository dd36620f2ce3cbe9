"""A model server slow to start (a model loading its weights: tens of seconds in production,
about a second here) gets no traffic until it is ready, and is not restarted for being slow;
while it is not ready, a line now and then says what the readiness probe saw.

A child that never becomes ready is restarted after startup_threshold_seconds (or the proxy
exits, with restart_policy never): tests/test_lifecycle.py,
test_a_child_never_ready_is_restarted_after_the_startup_threshold and
test_a_child_never_ready_makes_the_proxy_exit_with_restart_policy_never.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import aiohttp
import pytest

from proxy.config import load_config
from proxy.lifecycle import ModelServer
from proxy.supervisor import Reaper

from ..children import fetch, model_command
from ..conftest import echo_command, free_port, run_proxy, write_config
from . import READY, SAFETY, samples

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


class LineWaiter(logging.Handler):
    """A logging handler a test can wait on for a message matching a pattern."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)
        self.matched = asyncio.Event()
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        if not self.matched.is_set() and self.pattern.search(record.getMessage()):
            self.message = record.getMessage()
            self.matched.set()


@pytest.mark.parametrize(
    ("readiness_endpoint", "flags", "target", "seen"),
    [
        ("/ready", (), "GET /ready", "HTTP 503"),  # listens, says it is not ready
        (None, ("--listen-after-file",), "TCP 127.0.0.1:{port}", "connection refused"),
    ],
)
async def test_a_child_not_ready_gets_a_line_now_and_then_saying_what_the_probe_saw(
    tmp_path: Path,
    control: Path,
    readiness_endpoint: str | None,
    flags: tuple[str, ...],
    target: str,
    seen: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # in process, so that the interval (30 s in production) can be short
    port = free_port()
    config = load_config(
        write_config(
            tmp_path,
            server_port=port,
            start_command=model_command(port, control, *flags),
            readiness_endpoint=readiness_endpoint,
            liveness_endpoint=None,
        )
    )
    waiter = LineWaiter(r"is not ready \d+ s after its start; the readiness probe")
    caplog.set_level(logging.INFO, logger="model_proxy")
    logger = logging.getLogger("model_proxy")
    logger.addHandler(waiter)
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    try:
        model = ModelServer(
            config,
            reaper=reaper,
            on_phase=lambda phase, pid: None,
            on_restart=lambda: None,
            progress_interval=0.2,
        )
        life = asyncio.create_task(model.run())
        try:
            async with asyncio.timeout(SAFETY):
                await waiter.matched.wait()
        finally:
            model.kill()
            life.cancel()
            await asyncio.gather(life, return_exceptions=True)
            assert model.child is not None
            pid = model.child.pid
            async with asyncio.timeout(SAFETY):
                await model.child.wait_group_gone()
                await model.child.output_closed()
    finally:
        reaper.uninstall()
        logger.removeHandler(waiter)
    assert re.fullmatch(
        rf"the model server \(pid {pid}\) is not ready \d+ s after its start; the readiness"
        rf" probe \({re.escape(target.format(port=port))}\) last saw: {seen}",
        waiter.message,
    ), waiter.message
