"""The proxy's log as users read it, behind the real CLI: proxy.log_level (and Truss's
runtime.enable_debug_logs), text timestamps that carry their time zone, and model_name as a
field of every JSON line."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from .conftest import ROOT, fake_upstream, in_process_proxy, run_proxy, write_config
from .test_forward import request, send

CANNOT_RUN = "no-such-model-server"  # the shell says so on stderr, and the proxy gives up


def run_to_the_end(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_text_timestamps_are_iso_8601_with_the_offset(tmp_path: Path) -> None:
    config = write_config(tmp_path, start_command=CANNOT_RUN)

    result = run_to_the_end(config, TZ="IST-5:30")  # POSIX for +05:30: no zone files needed

    proxy_lines = [line for line in result.stderr.splitlines() if " model_proxy: " in line]
    assert proxy_lines
    for line in proxy_lines:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+05:30 ", line), line


def test_log_level_warning_keeps_only_warnings_and_errors_of_the_proxys_own(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, start_command=CANNOT_RUN, proxy={"log_level": "warning"})

    result = run_to_the_end(config)

    assert result.returncode == 1
    assert "ERROR   model_proxy: the start command cannot run" in result.stderr
    assert " INFO " not in result.stderr  # "listening on", "started the model server", ...
    # the model server's own lines are its business: still there
    assert re.search(rf"^\[model-server stderr\] .*{CANNOT_RUN}.*not found", result.stderr, re.M)


async def test_truss_enable_debug_logs_shows_what_each_probe_sees(tmp_path: Path) -> None:
    extra: dict[str, Any] = {"runtime": {"predict_concurrency": 1, "enable_debug_logs": True}}
    config = write_config(
        tmp_path,
        start_command="exec sleep 1000",  # never listens: readiness by TCP is refused
        readiness_endpoint=None,
        liveness_endpoint=None,
        extra=extra,
    )
    async with run_proxy(config, wait_ready=False) as proxy:
        line = await proxy.wait_for_log(r"DEBUG")
    assert re.search(
        r"DEBUG   model_proxy: the readiness probe \(TCP 127\.0\.0\.1:\d+\) sees: connection"
        r" refused$",
        line,
    ), line


def test_every_json_line_carries_the_model_name(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, start_command=CANNOT_RUN, proxy={"log_format": "json"}, extra={"model_name": "m7"}
    )

    result = run_to_the_end(config)

    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert {line["logger"] for line in lines} >= {"model_proxy", "model_server"}
    assert all(line["model"] == "m7" for line in lines), lines


async def test_access_lines_carry_the_model_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def health(http: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    async with (
        fake_upstream(app) as port,
        in_process_proxy(
            tmp_path, port, proxy={"log_format": "json"}, extra={"model_name": "m7"}
        ) as (proxy, url),
    ):
        assert (await send(url, request("GET", "/sync/health"))).status == 200
        assert proxy.access_log is not None
        with caplog.at_level(logging.INFO, logger="model_proxy.access"):
            proxy.access_log.flush()
    [line] = [json.loads(record.message) for record in caplog.records]
    assert (line["path"], line["model"]) == ("/sync/health", "m7")
