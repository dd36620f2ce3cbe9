"""The Seldon Core v1 Python microservice (seldon-core from PyPI) with examples/seldon's
model class, behind the proxy through the SELDON_MICROSERVICE preset."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from ..conftest import ROOT, free_port, run_proxy, write_config
from .conftest import SLOW, on_path

pytestmark = [pytest.mark.integration, SLOW]

EXAMPLE = ROOT / "examples" / "seldon"


async def test_seldon_microservice_behind_the_proxy(tmp_path: Path, seldon_venv: Path) -> None:
    weights = tmp_path / "my weights.json"  # a space: the preset quotes model_uri
    weights.write_text(json.dumps({"factor": 3}))
    config = write_config(
        tmp_path,
        predict_concurrency=2,
        extra={
            "implementation": "SELDON_MICROSERVICE",
            "model_uri": str(weights),
            "preset_args": {
                "model_class": "Scaler",
                # its gRPC and metrics servers would take 5000 and 6000
                "extra_args": f"--grpc-port {free_port()} --metrics-port {free_port()}",
            },
            "docker_server": {"server_port": free_port()},
            "environment_variables": {"PATH": on_path(seldon_venv), "PYTHONPATH": str(EXAMPLE)},
        },
    )

    async with (
        run_proxy(config, wait_ready=False) as proxy,
        aiohttp.ClientSession() as session,
    ):
        await proxy.wait_for_log("the model server is ready", timeout=90)
        request = {"data": {"names": ["a", "b"], "ndarray": [[1, 2], [3, 4.5]]}}
        async with session.post(proxy.url + "/predict", json=request) as response:
            assert response.status == 200
            body = await response.json()
            request_id = response.headers["X-Request-ID"]
        assert body["data"]["ndarray"] == [[3, 6], [9, 13.5]]
        # model_uri reached Scaler.__init__ through the preset's --parameters
        assert body["meta"]["tags"] == {"model_uri": str(weights)}
        assert request_id

        # the readiness route the preset probes, and the rest of the API, through /sync
        async with session.get(proxy.url + "/sync/health/status") as response:
            assert response.status == 200
            assert (await response.json())["jsonData"] == {"factor": 3.0}
        async with session.post(
            proxy.url + "/sync/api/v1.0/predictions", json={"data": {"ndarray": [[1]]}}
        ) as response:
            assert (await response.json())["data"]["ndarray"] == [[3]]
        # Seldon's own error, passed through untouched
        async with session.post(proxy.url + "/predict", data=b"not json") as response:
            assert response.status == 400
            assert "error" not in await response.json()
