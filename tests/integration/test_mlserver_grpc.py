"""MLServer from PyPI behind the proxy with its gRPC API on proxy.grpc_upstream_port: V2
inference over gRPC (ModelInfer, ModelStreamInfer) and REST on the same proxy port."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
from grpc import aio, protos_and_services

from ..conftest import free_port, run_proxy, write_config
from .conftest import SLOW, on_path
from .test_mlserver import model_folder

pytestmark = [pytest.mark.integration, SLOW]

PROTOS = Path(__file__).resolve().with_name("protos")


@functools.cache
def inference() -> tuple[ModuleType, ModuleType]:
    """The V2 inference protos, compiled at run time (grpcio-tools)."""
    sys.path.insert(0, str(PROTOS))
    try:
        return protos_and_services("inference.proto")  # type: ignore[no-any-return]
    finally:
        sys.path.remove(str(PROTOS))


async def test_mlserver_grpc_and_rest_on_one_proxy_port(
    tmp_path: Path, mlserver_venv: Path
) -> None:
    pb2, services = inference()
    folder, weights = model_folder(tmp_path)
    weights.write_text('{"factor": 1.5}')
    grpc_port = free_port()
    config = write_config(
        tmp_path,
        predict_concurrency=4,
        proxy={"grpc_upstream_port": grpc_port},
        extra={
            "model_name": "scaler",
            "implementation": "MLSERVER",
            "model_uri": str(folder),
            "docker_server": {"server_port": free_port()},
            "environment_variables": {
                "PATH": on_path(mlserver_venv),
                "MLSERVER_GRPC_PORT": grpc_port,
                "MLSERVER_METRICS_PORT": free_port(),
            },
        },
    )
    async with run_proxy(config, wait_ready=False) as proxy, aiohttp.ClientSession() as session:
        await proxy.wait_for_log("the model server is ready", timeout=90)
        async with aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
            stub = services.GRPCInferenceServiceStub(channel)
            # MLServer's gRPC server may come up a moment after its REST one
            ready = await stub.ModelReady(
                pb2.ModelReadyRequest(name="scaler"), wait_for_ready=True, timeout=30
            )
            assert ready.ready
            tensor = pb2.ModelInferRequest.InferInputTensor(
                name="x",
                datatype="FP64",
                shape=[3],
                contents=pb2.InferTensorContents(fp64_contents=[1, 2, 4]),
            )
            reply = await stub.ModelInfer(
                pb2.ModelInferRequest(model_name="scaler", inputs=[tensor])
            )
            [output] = reply.outputs
            assert output.name == "scaled"
            assert list(output.contents.fp64_contents) == [1.5, 3.0, 6.0]

            prompt = pb2.ModelInferRequest.InferInputTensor(
                name="text",
                datatype="BYTES",
                shape=[1],
                contents=pb2.InferTensorContents(bytes_contents=[b"one two three"]),
            )
            stream = stub.ModelStreamInfer(
                iter([pb2.ModelInferRequest(model_name="scaler", inputs=[prompt])])
            )
            words = [response.outputs[0].contents.bytes_contents[0] async for response in stream]
            assert words == [b"one", b"two", b"three"]

        # REST on the same port, HTTP/1.1
        inference_body = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [2]}]}
        async with session.post(proxy.url + "/predict", json=inference_body) as response:
            assert response.status == 200
            assert (await response.json())["outputs"][0]["data"] == [3.0]
        async with session.get(proxy.url + "/metrics") as response:
            metrics = await response.text()
    assert 'model_proxy_grpc_requests_total{grpc_code="OK"} 3.0' in metrics
    assert 'model_proxy_requests_total{code="200",method="POST",route="predict"} 1.0' in metrics
