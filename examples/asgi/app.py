"""A Starlette app served by uvicorn, the shape of most hand-written model servers: JSON
predictions, a token stream as Server-Sent Events, and a WebSocket.

    uvicorn app:app --app-dir examples/asgi --host 127.0.0.1 --port 8000
"""

import asyncio
import json
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

MODEL = os.environ.get("MODEL_NAME", "asgi-demo")


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def predict(request: Request) -> JSONResponse:
    body = await request.json()
    words = str(body.get("prompt", "")).split()
    return JSONResponse({"model": MODEL, "completion": " ".join(reversed(words))})


async def generate(request: Request) -> StreamingResponse:
    """`?n=20&interval=0.1`: n events, like an LLM's tokens, then `data: [DONE]`. A client
    that leaves cancels the generator: the server prints how far it got."""
    n = int(request.query_params.get("n", 20))
    interval = float(request.query_params.get("interval", 0.1))

    async def events() -> AsyncIterator[str]:
        sent = 0
        try:
            for i in range(n):
                yield f"data: {json.dumps({'token': i})}\n\n"
                sent += 1
                await asyncio.sleep(interval)
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            print(f"generation cancelled after {sent} tokens", flush=True)
            raise

    return StreamingResponse(events(), media_type="text/event-stream")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text(f"echo: {message['text']}")
            elif message.get("bytes") is not None:
                await websocket.send_bytes(message["bytes"][::-1])
    except WebSocketDisconnect:
        return


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/predict", predict, methods=["POST"]),
        Route("/generate", generate, methods=["GET", "POST"]),
        WebSocketRoute("/ws", echo),
    ]
)
