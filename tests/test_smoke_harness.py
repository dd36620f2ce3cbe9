"""The harness itself: both ways of running the proxy carry a request."""

from pathlib import Path

import aiohttp
from aiohttp import web

from .conftest import fake_upstream, in_process_proxy, run_proxy, write_config


async def test_in_process_proxy_forwards_to_a_fake_upstream(tmp_path: Path) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path_qs})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    async with (
        fake_upstream(app) as port,
        in_process_proxy(tmp_path, port) as (_, url),
        aiohttp.ClientSession() as session,
        session.get(url + "/sync/a/b?x=1") as response,
    ):
        assert response.status == 200
        assert await response.json() == {"path": "/a/b?x=1"}


async def test_cli_proxy_runs_the_echo_example(tmp_path: Path) -> None:
    async with (
        run_proxy(write_config(tmp_path)) as proxy,
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/predict", json={"x": 1}) as response,
    ):
        assert response.status == 200
        assert await response.json() == {"echo": {"x": 1}, "model": "echo"}
