"""MLServer from PyPI, with examples/mlserver's custom runtime, behind the proxy through the
MLSERVER preset: readiness while the model loads, V2 inference through /predict, and
infer_stream's Server-Sent Events through /sync."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import aiohttp
import pytest

from ..conftest import ROOT, free_port, promtool_problems, run_proxy, write_config
from .conftest import SLOW, on_path

pytestmark = [pytest.mark.integration, SLOW]

EXAMPLE = ROOT / "examples" / "mlserver" / "scaler"


def model_folder(directory: Path) -> tuple[Path, Path]:
    """The example's runtime in `directory`, its weights (not written yet) beside it."""
    folder = directory / "scaler"
    folder.mkdir()
    shutil.copy(EXAMPLE / "runtime.py", folder)
    weights = directory / "weights.json"
    settings = json.loads((EXAMPLE / "model-settings.json").read_text())
    settings["parameters"]["uri"] = str(weights)
    (folder / "model-settings.json").write_text(json.dumps(settings))
    return folder, weights


async def test_mlserver_behind_the_proxy(tmp_path: Path, mlserver_venv: Path) -> None:
    folder, weights = model_folder(tmp_path)
    server_port, metrics_port = free_port(), free_port()
    config = write_config(
        tmp_path,
        predict_concurrency=4,
        # the preset merges MLServer's metrics from its port 8082: moved here, as the server's
        proxy={"upstream_metrics_port": metrics_port},
        extra={
            "model_name": "scaler",
            "implementation": "MLSERVER",
            "model_uri": str(folder),
            # the preset fills the rest; MLSERVER_PARALLEL_WORKERS=0 comes from it too
            "docker_server": {"server_port": server_port},
            "environment_variables": {
                "PATH": on_path(mlserver_venv),
                "MLSERVER_GRPC_PORT": free_port(),
                "MLSERVER_METRICS_PORT": metrics_port,
            },
        },
    )

    async with run_proxy(config, wait_ready=False) as proxy, aiohttp.ClientSession() as session:
        # uvicorn's line, once the port is bound (MLServer's own "HTTP server running" is
        # logged before)
        await proxy.wait_for_log(
            rf"Uvicorn running on http://127\.0\.0\.1:{server_port}\b", timeout=90
        )
        await proxy.wait_for_log("loading weights from", timeout=30)  # the runtime's load()
        # MLServer listens, the model is loading: it says 400 (not 503) for the model...
        async with session.get(
            f"http://127.0.0.1:{server_port}/v2/models/scaler/ready"
        ) as response:
            assert response.status == 400
        # ...and the proxy, probing that route, holds traffic
        async with session.get(proxy.url + "/ready") as response:
            assert response.status == 503
        async with session.post(proxy.url + "/predict", json={}) as response:
            assert response.status == 503
            assert (await response.json())["error"]["type"] == "not_ready"
            assert response.headers["Retry-After"].isdigit()

        partial = tmp_path / "weights.partial"
        partial.write_text(json.dumps({"factor": 2.5}))
        partial.rename(weights)  # at once: load() never sees half a file
        await proxy.wait_for_log("the model server is ready", timeout=60)

        async with session.get(proxy.url + "/ready") as response:
            assert response.status == 200
        inference = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [1, 2, 4]}]}
        async with session.post(proxy.url + "/predict", json=inference) as response:
            assert response.status == 200
            body = await response.json()
        assert body["model_name"] == "scaler"
        [output] = body["outputs"]
        assert (output["name"], output["data"]) == ("scaled", [2.5, 5.0, 10.0])

        prompt = {
            "inputs": [
                {
                    "name": "text",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": ["tokens arrive one by one"],
                }
            ]
        }
        async with session.post(
            proxy.url + "/sync/v2/models/scaler/infer_stream", json=prompt
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = [
                json.loads(line.removeprefix(b"data: "))
                async for line in response.content
                if line.startswith(b"data: ")
            ]
        words = [event["outputs"][0]["data"][0] for event in events]
        assert words == ["tokens", "arrive", "one", "by", "one"]

        async with session.get(proxy.url + "/metrics") as response:
            metrics = await response.text()
        assert "model_proxy_upstream_ready 1.0" in metrics
        # MLServer's own metrics, merged: its REST server counted the inference
        assert "model_proxy_upstream_metrics_up 1.0" in metrics
        assert re.search(
            r'^rest_server_requests_total\{[^}]*path="/v2/models/\{model_name\}/infer",'
            r'status_code="200"\} 1\.0$',
            metrics,
            re.MULTILINE,
        )
        assert 'model_proxy_time_to_first_event_seconds_count{route="sync"} 1.0' in metrics
        assert await promtool_problems(metrics) in ([], None)
        assert 'model_proxy_requests_total{code="503",method="POST",route="predict"} 1.0' in metrics
