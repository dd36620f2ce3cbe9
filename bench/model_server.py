"""The Python model-like backend: aiohttp on uvloop, as a typical model server is.

    POST /predict          small JSON in, small JSON out; ?delay=S sleeps S first ("inference")
    GET  /stream           Server-Sent Events: ?n=50&interval=0.02, each event
                           `data: {"i": i, "t": <unix time when written>}` (the last with an
                           OpenAI-style `"usage"`, as a stream's last chunk has), then
                           `data: [DONE]`
    GET  /ws               WebSocket echo
    GET  /health           200 once loaded (after --load-seconds), 503 before

`--ready-file PATH` gets the unix time at which /health turned 200, so the bench can time
how long the proxy takes to notice.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path

import uvloop
from aiohttp import WSMsgType, web

READY = web.AppKey("ready", asyncio.Event)


async def predict(request: web.Request) -> web.Response:
    delay = float(request.query.get("delay", "0"))
    payload = await request.json()
    if delay:
        await asyncio.sleep(delay)
    return web.json_response({"outputs": payload.get("inputs"), "model": "bench"})


async def stream(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", "50"))
    interval = float(request.query.get("interval", "0.02"))
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for i in range(n):
        if i:
            await asyncio.sleep(interval)
        usage = b""
        if i == n - 1:
            usage = b', "usage": {"prompt_tokens": 8, "completion_tokens": %d}' % n
        await response.write(b'data: {"i": %d, "t": %.6f%s}\n\n' % (i, time.time(), usage))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def health(request: web.Request) -> web.Response:
    ok = request.app[READY].is_set()
    return web.json_response({"ok": ok}, status=200 if ok else 503)


def create_app() -> web.Application:
    app = web.Application()
    app[READY] = asyncio.Event()
    app.router.add_post("/predict", predict)
    app.router.add_get("/stream", stream)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/health", health)
    return app


async def serve(port: int, load_seconds: float, ready_file: Path | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = create_app()
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    # a deep backlog: 1,000 streams connect at once when the bench talks to it directly
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print(f"model server listening on 127.0.0.1:{port}", flush=True)
    if load_seconds:
        await asyncio.sleep(load_seconds)
    ready_at = time.time()
    app[READY].set()
    if ready_file is not None:
        await asyncio.to_thread(ready_file.write_text, f"{ready_at:.6f}\n")
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--ready-file", type=Path)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.load_seconds, args.ready_file))


if __name__ == "__main__":
    main()
