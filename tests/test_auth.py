"""proxy.api_key_secret: proxied routes (WebSockets included) need the key, as
`Authorization: Bearer <key>` or `Api-Key <key>`; /health and /ready stay open, /metrics
too unless metrics_require_api_key; the key is never logged, nor shown by `check`."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import load_config
from proxy.errors import ConfigError

from .conftest import ROOT, fake_upstream, in_process_proxy, run_proxy, write_config
from .test_forward import SAFETY, error_type, request, send
from .test_metrics import scrape

KEY = "s3cret-K3y/+=_~"
SECRET = "api_key"


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    """The key's file (in write_config's secrets_dir), with whitespace around the key."""
    (tmp_path / SECRET).write_text(f"  {KEY} \n\n")
    return tmp_path


class Upstream:
    """A model server that records the requests it gets, with a WebSocket echo on /ws."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.app = web.Application()
        self.app.router.add_get("/ws", self.websocket)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        return web.json_response({"path": request.path})

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.seen.append(request.path)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws


def auth(value: str) -> list[tuple[str, str]]:
    return [("Authorization", value)]


REFUSED = {
    "missing": [],
    "empty": auth(""),
    "scheme only": auth("Bearer"),
    "empty key": auth("Bearer "),
    "wrong key": auth("Bearer wrong"),
    "key with more": auth(f"Bearer {KEY}x"),
    "key cut short": auth(f"Bearer {KEY[:-1]}"),
    "key in another case": auth(f"Bearer {KEY.upper()}"),
    "no scheme": auth(KEY),
    "other scheme": auth(f"Token {KEY}"),
    "basic": auth("Basic dXNlcjpzM2NyZXQ="),
    "scheme glued": auth(f"Bearer:{KEY}"),
}
ACCEPTED = {
    "bearer": auth(f"Bearer {KEY}"),
    "api-key": auth(f"Api-Key {KEY}"),
    "lower case scheme": auth(f"bearer {KEY}"),
    "upper case scheme": auth(f"API-KEY {KEY}"),
    "extra spaces": auth(f"Bearer   {KEY}  "),
}  # and the key's file has whitespace around it: stripped


@pytest.mark.parametrize("headers", REFUSED.values(), ids=REFUSED.keys())
async def test_proxied_routes_refuse_a_missing_or_wrong_key(
    secrets: Path, headers: list[tuple[str, str]]
) -> None:
    upstream = Upstream()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(secrets, port, proxy={"api_key_secret": SECRET}) as (proxy, url),
    ):
        for target in ("/predict", "/sync/x"):
            response = await send(url, request("POST", target, headers, b"{}"))
            assert response.status == 401
            assert error_type(response) == "unauthorized"
            assert response.header("www-authenticate") == 'Bearer realm="model-proxy"'
        assert upstream.seen == []
        assert proxy.metrics.rejected == {"unauthorized": 2}
        assert proxy.metrics.requests == {("predict", "POST", 401): 1, ("sync", "POST", 401): 1}


@pytest.mark.parametrize("headers", ACCEPTED.values(), ids=ACCEPTED.keys())
async def test_proxied_routes_take_the_key_in_either_scheme(
    secrets: Path, headers: list[tuple[str, str]]
) -> None:
    upstream = Upstream()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(secrets, port, proxy={"api_key_secret": SECRET}) as (proxy, url),
    ):
        for target, path in (("/predict", "/predict"), ("/sync/x", "/x")):
            response = await send(url, request("POST", target, headers, b"{}"))
            assert (response.status, response.json()) == (200, {"path": path})
        assert upstream.seen == ["/predict", "/x"]
        assert proxy.metrics.rejected == {}


async def test_a_websocket_upgrade_needs_the_key(secrets: Path) -> None:
    upstream = Upstream()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(secrets, port, proxy={"api_key_secret": SECRET}) as (proxy, url),
        aiohttp.ClientSession() as session,
        asyncio.timeout(SAFETY),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(url + "/sync/ws", headers=headers)
            assert refused.value.status == 401
        assert upstream.seen == []
        for scheme in ("Bearer", "Api-Key"):
            headers = {"Authorization": f"{scheme} {KEY}"}
            async with session.ws_connect(url + "/sync/ws", headers=headers) as ws:
                await ws.send_str("hello")
                assert await ws.receive_str() == "hello"
        assert upstream.seen == ["/ws", "/ws"]
        assert proxy.metrics.rejected == {"unauthorized": 2}


async def test_health_ready_and_metrics_stay_open_by_default(secrets: Path) -> None:
    upstream = Upstream()
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(secrets, port, proxy={"api_key_secret": SECRET}) as (proxy, url),
    ):
        for path in ("/health", "/ready", "/metrics"):
            response = await send(url, request("GET", path))
            assert response.status == 200, path
        assert proxy.metrics.requests == {}  # none of them is counted


async def test_metrics_can_require_the_key(secrets: Path) -> None:
    upstream = Upstream()
    settings = {"api_key_secret": SECRET, "metrics_require_api_key": True}
    async with (
        fake_upstream(upstream.app) as port,
        in_process_proxy(secrets, port, proxy=settings) as (_, url),
        aiohttp.ClientSession() as session,
    ):
        for headers in ([], auth("Bearer wrong")):
            response = await send(url, request("GET", "/metrics", headers))
            assert response.status == 401
            assert error_type(response) == "unauthorized"
            assert response.header("www-authenticate") == 'Bearer realm="model-proxy"'
        for path in ("/health", "/ready"):
            assert (await send(url, request("GET", path))).status == 200, path
        for headers in (auth(f"Bearer {KEY}"), auth(f"api-key {KEY}")):
            response = await send(url, request("GET", "/metrics", headers))
            assert response.status == 200
            assert b"model_proxy_requests_total" in response.body
        session.headers["Authorization"] = f"Bearer {KEY}"
        samples = await scrape(session, url)
        # the refused scrapes are not requests to the model: not counted anywhere
        assert not any(key.startswith("model_proxy_requests_total{") for key in samples)
        assert 'model_proxy_rejected_requests_total{reason="unauthorized"}' not in samples


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (
            {"api_key_secret": SECRET, "metrics_require_api_key": "yes"},
            'proxy.metrics_require_api_key: must be true or false (got "yes")',
        ),
        (
            {"api_key_secret": SECRET, "metrics_require_api_key": 1},
            "proxy.metrics_require_api_key: must be true or false (got 1)",
        ),
        (
            {"metrics_require_api_key": True},
            "proxy.metrics_require_api_key: needs proxy.api_key_secret set (got true)",
        ),
    ],
)
def test_metrics_require_api_key_is_checked(
    secrets: Path, settings: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write_config(secrets, proxy=settings))
    assert error.value.problems == [problem]


def test_metrics_require_api_key_defaults_to_false(secrets: Path) -> None:
    config = load_config(write_config(secrets, proxy={"api_key_secret": SECRET}))
    assert config.proxy.metrics_require_api_key is False
    config = load_config(
        write_config(secrets, proxy={"api_key_secret": SECRET, "metrics_require_api_key": True})
    )
    assert config.proxy.metrics_require_api_key is True


# -- the key never shows ------------------------------------------------------------------


async def test_the_key_is_never_logged(secrets: Path) -> None:
    config = write_config(secrets, proxy={"api_key_secret": SECRET, "log_format": "json"})
    async with aiohttp.ClientSession() as session, run_proxy(config) as proxy:
        attempts = [
            {},
            {"Authorization": f"Bearer {KEY}x"},  # wrong, and holding the key
            {"Authorization": f"Api-Key {KEY}"},
            {"Authorization": f"Bearer {KEY}", "X-Request-ID": "with-the-key"},
        ]
        statuses = []
        for headers in attempts:
            async with session.post(proxy.url + "/predict", json={}, headers=headers) as response:
                statuses.append(response.status)
        async with session.ws_connect(
            proxy.url + "/sync/ws", headers={"Authorization": f"Bearer {KEY}"}
        ) as ws:
            await ws.send_str("hi")
            assert await ws.receive_str() == "hi"
        assert statuses == [401, 401, 200, 200]
        proxy.signal(signal.SIGTERM)
        assert await proxy.exited() == 0
    assert "the model server is ready" in proxy.log
    assert KEY not in proxy.log


def test_check_shows_the_secrets_name_only(secrets: Path) -> None:
    config = write_config(secrets, proxy={"api_key_secret": SECRET})
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"api_key_secret: {SECRET}\n" in result.stdout
    assert KEY not in result.stdout + result.stderr
