"""A Starlette app served by uvicorn, the shape of most hand-written model servers: JSON
predictions, a token stream as Server-Sent Events, an OpenAI-compatible chat completions
route (a "model" that answers the prompt's words backwards), its own Prometheus metrics,
and a WebSocket.

    uvicorn app:app --app-dir examples/asgi --host 127.0.0.1 --port 8000
"""

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

MODEL = os.environ.get("MODEL_NAME", "asgi-demo")
# how long the "model" takes to its first token (prefill), and between tokens
FIRST_TOKEN_SECONDS = float(os.environ.get("FIRST_TOKEN_SECONDS", "0.1"))
TOKEN_INTERVAL_SECONDS = float(os.environ.get("TOKEN_INTERVAL_SECONDS", "0.02"))
COMPLETION_TOKENS = Counter("asgi_demo_completion_tokens", "Tokens generated.")


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


async def chat_completions(request: Request) -> Response:
    """OpenAI's POST /v1/chat/completions: a JSON answer, or with `"stream": true` a
    chat.completion.chunk per token, and with `stream_options.include_usage` a last chunk
    with the usage (every other chunk says `"usage": null`), then `data: [DONE]`."""
    body = await request.json()
    words = " ".join(
        str(message.get("content", "")) for message in body.get("messages", [])
    ).split()
    tokens = list(reversed(words))[: body.get("max_tokens") or len(words)]
    usage = {
        "prompt_tokens": len(words),
        "completion_tokens": len(tokens),
        "total_tokens": len(words) + len(tokens),
    }
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": MODEL}
    if not body.get("stream"):
        await asyncio.sleep(FIRST_TOKEN_SECONDS + TOKEN_INTERVAL_SECONDS * len(tokens[1:]))
        COMPLETION_TOKENS.inc(len(tokens))
        message = {"role": "assistant", "content": " ".join(tokens)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return JSONResponse(
            {**head, "object": "chat.completion", "choices": [choice], "usage": usage}
        )
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(choices: list[dict[str, object]], **extra: object) -> str:
        data = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
        if include_usage and "usage" not in extra:
            data["usage"] = None
        return f"data: {json.dumps(data)}\n\n"

    async def events() -> AsyncIterator[str]:
        for i, token in enumerate(tokens):
            await asyncio.sleep(TOKEN_INTERVAL_SECONDS if i else FIRST_TOKEN_SECONDS)
            COMPLETION_TOKENS.inc()
            delta = {"content": token if i == 0 else f" {token}"}
            yield chunk([{"index": 0, "delta": delta, "finish_reason": None}])
        yield chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if include_usage:
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def metrics(request: Request) -> Response:
    """prometheus-client's default registry: the app's counter, process_*, python_*."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


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
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/metrics", metrics),
        WebSocketRoute("/ws", echo),
    ]
)
