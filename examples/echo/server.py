"""A tiny model server to run behind model-proxy: echo, SSE, WebSocket, upload and download.

Only aiohttp and the standard library. Run it from the repository root:

    python examples/echo/server.py --port 8000      # or PORT=8000 python examples/echo/server.py

Routes:

    GET  /health           200 {"status": "ok"} once loaded, 503 {"status": "loading"} before
    POST /predict          {"echo": <request JSON>, "model": "echo"}; ?delay=S sleeps S first
    GET|POST /stream       Server-Sent Events: ?n=10&interval=0.2, then "data: [DONE]"
    GET  /ws               WebSocket echo (subprotocols "echo", "chat");
                           the text "close:<code>:<reason>" closes with that code and reason
    GET  /headers          the request's headers as JSON (names lower-cased)
    POST /upload           {"bytes": N, "sha256": "..."} of the body, read chunk by chunk
    GET  /download?size=N  N bytes, chunked; byte k of the body is k % 256

`--port 0` picks a free port; the startup line `echo server listening on HOST:PORT` names it.
Errors of its own are `{"error": {"type": ..., "message": ...}}` with types `invalid_json` and
`invalid_parameter`, so they can be told apart from the proxy's own errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.typedefs import Handler

DEFAULT_PORT = 8000
DOWNLOAD_CHUNK = bytes(range(256)) * 256  # 64 KiB: a pattern whose byte k is k % 256
UPLOAD_CHUNK_SIZE = 64 * 1024
# Subprotocols the server accepts; aiohttp picks the first of the client's list that is among them.
WS_PROTOCOLS = ("echo", "chat")
# How long in-flight requests may finish after SIGTERM/SIGINT before they are cancelled; the
# proxy only signals the model server once its own drain is over, so little is left to wait for.
SHUTDOWN_TIMEOUT_SECONDS = 1.0

READY = web.AppKey("ready", asyncio.Event)
LOAD_SECONDS = web.AppKey("load_seconds", float)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet[web.WebSocketResponse])


def _error(status: int, error_type: str, message: str) -> web.Response:
    body = {"error": {"type": error_type, "message": message}}
    return web.json_response(body, status=status)


class BadParameterError(Exception):
    """A query parameter that is not a number in range; answered with 400."""


def _query_float(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadParameterError(f"{name} must be a number (got {raw!r})") from None
    if not value >= 0 or value == float("inf"):  # also rejects NaN
        raise BadParameterError(f"{name} must be a finite number >= 0 (got {raw!r})")
    return value


def _query_int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadParameterError(f"{name} must be an integer (got {raw!r})") from None
    if value < 0:
        raise BadParameterError(f"{name} must be >= 0 (got {raw!r})")
    return value


@web.middleware
async def bad_parameters(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadParameterError as exc:
        return _error(400, "invalid_parameter", str(exc))


async def health(request: web.Request) -> web.Response:
    if request.app[READY].is_set():
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "loading"}, status=503)


async def predict(request: web.Request) -> web.Response:
    delay = _query_float(request, "delay", 0.0)
    try:
        payload: Any = await request.json()
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _error(400, "invalid_json", f"request body is not valid JSON: {exc}")
    if delay:
        await asyncio.sleep(delay)
    return web.json_response({"echo": payload, "model": "echo"})


async def stream(request: web.Request) -> web.StreamResponse:
    n = _query_int(request, "n", 10)
    interval = _query_float(request, "interval", 0.2)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    sent = 0
    try:
        for i in range(n):
            if i:
                await asyncio.sleep(interval)
            event = json.dumps({"i": i, "t": time.time()})
            await response.write(f"data: {event}\n\n".encode())
            sent += 1
        await response.write(b"data: [DONE]\n\n")
    except asyncio.CancelledError:
        # The client went away (the runner cancels handlers on disconnect): stop generating.
        print(f"stream cancelled after {sent} events", flush=True)
        raise
    except ConnectionResetError:  # the disconnect was noticed by a write instead
        print(f"stream cancelled after {sent} events", flush=True)
        return response
    await response.write_eof()
    return response


def _close_command(text: str) -> tuple[int, str] | None:
    """Parse `close:<code>:<reason>` (the reason may be empty or absent); None if it is not one."""
    if not text.startswith("close:"):
        return None
    code_text, _, reason = text.removeprefix("close:").partition(":")
    try:
        code = int(code_text)
    except ValueError:
        return None
    return code, reason


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=WS_PROTOCOLS, max_msg_size=0)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                command = _close_command(msg.data)
                if command is not None:
                    code, reason = command
                    await ws.close(code=code, message=reason.encode())
                    break
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
    finally:
        request.app[WEBSOCKETS].discard(ws)
    return ws


async def close_websockets(app: web.Application) -> None:
    """On shutdown, say goodbye (1001) to open WebSockets instead of dropping them."""
    sockets = app[WEBSOCKETS]
    closing = [  # over a copy: each handler removes its socket as it ends
        ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in list(sockets)
    ]
    await asyncio.gather(*closing, return_exceptions=True)


async def headers(request: web.Request) -> web.Response:
    # Lower-cased names, so a lookup does not depend on how a proxy spelled them; a header
    # sent more than once is joined with ", " as HTTP allows (X-Forwarded-For, for one).
    seen: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        seen[key] = f"{seen[key]}, {value}" if key in seen else value
    return web.json_response(seen)


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_chunked(UPLOAD_CHUNK_SIZE):
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"bytes": size, "sha256": digest.hexdigest()})


async def download(request: web.Request) -> web.StreamResponse:
    size = _query_int(request, "size", 0)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    remaining = size
    while remaining > 0:
        chunk = DOWNLOAD_CHUNK[: min(remaining, len(DOWNLOAD_CHUNK))]
        await response.write(chunk)
        remaining -= len(chunk)
    await response.write_eof()
    return response


async def loading(app: web.Application) -> AsyncIterator[None]:
    """Become ready `load_seconds` after startup, as a model that loads its weights would."""
    load_seconds = app[LOAD_SECONDS]
    if load_seconds <= 0:
        app[READY].set()
        yield
        return

    async def load() -> None:
        await asyncio.sleep(load_seconds)
        app[READY].set()
        print(f"echo model loaded after {load_seconds:g}s", flush=True)

    task = asyncio.create_task(load())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(*, load_seconds: float = 0.0) -> web.Application:
    app = web.Application(middlewares=[bad_parameters])
    app[READY] = asyncio.Event()
    app[LOAD_SECONDS] = load_seconds
    app[WEBSOCKETS] = weakref.WeakSet()
    app.cleanup_ctx.append(loading)
    app.on_shutdown.append(close_websockets)
    app.router.add_get("/health", health)
    app.router.add_post("/predict", predict)
    app.router.add_route("GET", "/stream", stream)
    app.router.add_route("POST", "/stream", stream)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/headers", headers)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    return app


async def serve(host: str, port: int, *, load_seconds: float, access_log: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    access_logger: logging.Logger | None = None
    if access_log:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        access_logger = logging.getLogger("aiohttp.access")
    runner = web.AppRunner(
        create_app(load_seconds=load_seconds),
        # Cancel a handler when its client disconnects: a stream stops generating at once.
        handler_cancellation=True,
        access_log=access_logger,
        access_log_format='%a "%r" %s %b %Tfs',
        shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]  # the real one when --port 0 was asked for
        print(f"echo server listening on {host}:{bound_port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The echo model server (a model-proxy example).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--port",
        type=int,
        default=os.environ.get("PORT", str(DEFAULT_PORT)),
        help=f"port to listen on; 0 picks a free one (default: $PORT, else {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--load-seconds",
        type=float,
        default=0.0,
        help="answer /health with 503 for this long after startup, as if loading a model",
    )
    parser.add_argument("--access-log", action="store_true", help="log every request to stdout")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    asyncio.run(
        serve(args.host, args.port, load_seconds=args.load_seconds, access_log=args.access_log)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
