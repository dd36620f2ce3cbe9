"""The real proxy (`python -m proxy run`) in front of examples/grpc/server.py, a gRPC-only
child (runtime.transport.kind grpc): readiness from its health service, every call kind
with the example's protos, and the drain of HTTP/2 connections (GOAWAY, then the grace)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio

from .conftest import ROOT, free_port, run_proxy, write_config
from .h2peers import H2Client, grpc_frame, grpc_request

EXAMPLE = ROOT / "examples" / "grpc"
GRPC_CHILD = ROOT / "tests" / "faults" / "grpc_child.py"
SAFETY = 10.0


@functools.cache
def protos() -> tuple[ModuleType, ModuleType]:
    """The example's model.proto compiled at run time, as the example server does."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        return grpc.protos_and_services("model.proto")  # type: ignore[no-any-return]
    finally:
        sys.path.remove(str(EXAMPLE))


def example_config(tmp_path: Path, *flags: str, **proxy: Any) -> Path:
    port = free_port()
    command = f"exec {sys.executable} {EXAMPLE / 'server.py'} --port {port} {' '.join(flags)}"
    return write_config(
        tmp_path,
        server_port=port,
        start_command=command,
        predict_endpoint="/model.v1.Model/Predict",
        readiness_endpoint=None,
        liveness_endpoint=None,
        proxy={"grpc_health_service": "model.v1.Model", **proxy},
        extra={"runtime": {"predict_concurrency": 8, "transport": {"kind": "grpc"}}},
    )


def chat_message(text: str) -> bytes:
    """model.v1.ChatMessage{text}, encoded by hand for the raw HTTP/2 client."""
    data = text.encode()
    return grpc_frame(b"\x0a" + bytes([len(data)]) + data)


async def test_readiness_follows_the_health_service_then_every_call_kind_passes(
    tmp_path: Path,
) -> None:
    pb2, services = protos()
    weights = tmp_path / "weights.json"
    config = example_config(tmp_path, "--weights", str(weights))
    async with run_proxy(config, wait_ready=False) as proxy, aiohttp.ClientSession() as session:
        await proxy.wait_for_log("loading weights from", timeout=30)
        async with session.get(proxy.url + "/ready") as response:
            assert response.status == 503  # the port answers; the health service says no
        async with aio.insecure_channel(f"127.0.0.1:{proxy.port}") as chan:
            stub = services.ModelStub(chan)
            with pytest.raises(aio.AioRpcError) as refused:
                await stub.Predict(pb2.PredictRequest(inputs=[1.0]))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            partial = tmp_path / "weights.partial"
            partial.write_text(json.dumps({"factor": 3}))
            partial.rename(weights)
            await proxy.wait_for_log("the model server is ready", timeout=30)

            reply = await stub.Predict(pb2.PredictRequest(inputs=[1.0, 2.5]))
            assert list(reply.outputs) == [3.0, 7.5]
            tokens = [t.text async for t in stub.Generate(pb2.GenerateRequest(prompt="a b c"))]
            assert tokens == ["a", "b", "c"]

            async def chunks() -> Any:
                for size in (10, 20, 30):
                    yield pb2.Chunk(data=b"z" * size)

            uploaded = await stub.Upload(chunks())
            assert (uploaded.bytes, uploaded.chunks) == (60, 3)
            chat = stub.Chat()
            await chat.write(pb2.ChatMessage(text="hi"))
            assert (await chat.read()).text == "echo: hi"
            await chat.done_writing()
            assert await chat.code() == grpc.StatusCode.OK
        async with session.get(proxy.url + "/metrics") as response:
            metrics = await response.text()
    assert 'model_proxy_grpc_requests_total{grpc_code="OK"} 4.0' in metrics
    assert 'model_proxy_grpc_requests_total{grpc_code="UNAVAILABLE"} 1.0' in metrics
    assert 'model_proxy_requests_total{code="200",method="POST",route="grpc"} 5.0' in metrics


async def test_the_drain_sends_goaway_and_lets_open_calls_finish(tmp_path: Path) -> None:
    config = example_config(tmp_path, drain_quiet_seconds=0.2, shutdown_grace_seconds=20)
    async with run_proxy(config) as proxy:
        client = await H2Client.connect(proxy.port)
        chat = grpc_request(proxy.port, b"/model.v1.Model/Chat")
        stream_id = client.request(chat, chat_message("before"), end=False)
        reply = client.replies[stream_id]
        async with asyncio.timeout(SAFETY):
            while len(reply.data) < len(chat_message("echo: before")):
                reply.got_data.clear()
                await reply.got_data.wait()

        proxy.signal(signal.SIGTERM)
        async with asyncio.timeout(SAFETY):
            await client.got_goaway.wait()  # after the quiet period
        assert client.goaway is not None
        assert (client.goaway.error_code, client.goaway.last_stream_id) == (0, stream_id)

        # the call in flight goes on, to its end
        await client.send_all(stream_id, chat_message("after"), end=True)
        reply = await client.reply(stream_id)
        assert bytes(reply.data) == chat_message("echo: before") + chat_message("echo: after")
        assert reply.trailer(b"grpc-status") == b"0"
        assert await proxy.exited() == 0
        await client.close()
    assert "listener closed; 1 requests in flight" in proxy.log


async def test_calls_still_open_after_the_grace_are_reset(tmp_path: Path) -> None:
    config = example_config(tmp_path, drain_quiet_seconds=0.1, shutdown_grace_seconds=1)
    async with run_proxy(config) as proxy:
        client = await H2Client.connect(proxy.port)
        chat = grpc_request(proxy.port, b"/model.v1.Model/Chat")
        stream_id = client.request(chat, chat_message("stay"), end=False)
        reply = client.replies[stream_id]
        async with asyncio.timeout(SAFETY):
            await reply.got_data.wait()
        proxy.signal(signal.SIGTERM)
        reply = await client.reply(stream_id)
        assert reply.reset_code == 0x8  # CANCEL
        assert await proxy.exited() == 0
        await client.close()
    assert "1 requests still in flight after the grace" in proxy.log


async def test_a_new_stream_after_goaway_is_refused(tmp_path: Path) -> None:
    config = example_config(tmp_path, drain_quiet_seconds=0.1, shutdown_grace_seconds=20)
    async with run_proxy(config) as proxy:
        client = await H2Client.connect(proxy.port)
        chat = grpc_request(proxy.port, b"/model.v1.Model/Chat")
        open_id = client.request(chat, chat_message("hold"), end=False)
        async with asyncio.timeout(SAFETY):
            await client.replies[open_id].got_data.wait()
        proxy.signal(signal.SIGTERM)
        async with asyncio.timeout(SAFETY):
            await client.got_goaway.wait()
        late = await client.reply(client.request(grpc_request(proxy.port, b"/x.Y/Z")))
        assert late.reset_code == 0x7  # REFUSED_STREAM: never processed, safe to retry
        client.conn.end_stream(open_id)
        client.flush()
        assert (await client.reply(open_id)).trailer(b"grpc-status") == b"0"
        assert await proxy.exited() == 0
        await client.close()


async def test_a_grpc_child_failing_its_health_check_is_restarted(tmp_path: Path) -> None:
    """Readiness and liveness of a gRPC-only child are its Health/Check for
    grpc_health_service (the child says NOT_SERVING for any other name): NOT_SERVING past
    restart_threshold_seconds restarts it, as a failing HTTP liveness probe does."""
    control = tmp_path / "control"
    control.mkdir()
    port = free_port()
    service = "model.v1.Model"
    command = (
        f"exec {sys.executable} {GRPC_CHILD} --port {port} --dir {control} --service {service}"
    )
    runtime = {
        "predict_concurrency": 2,
        "transport": {"kind": "grpc"},
        "health_checks": {"restart_threshold_seconds": 0.3},
    }
    config = write_config(
        tmp_path,
        server_port=port,
        start_command=command,
        readiness_endpoint=None,
        liveness_endpoint=None,
        proxy={"probe_interval_seconds": 0.05, "grpc_health_service": service},
        extra={"runtime": runtime},
    )
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as session:
        pid = int((control / "server.pid").read_text())
        mark = len(proxy.lines)
        os.kill(pid, signal.SIGUSR1)  # its health service now says NOT_SERVING
        await proxy.wait_for_log("failed its liveness probe; restarting in 1 s", after=mark)
        await proxy.wait_for_log("the model server is ready", after=mark)
        async with session.get(proxy.url + "/ready") as response:
            assert response.status == 200
            ready = await response.json()
    assert ready["restarts"] == 1
    assert ready["pid"] == int((control / "server.pid").read_text()) != pid
