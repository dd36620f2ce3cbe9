"""Idle keep-alive connections: open them, make one small request on each (all at once),
then hold them open and quiet until told to let go (stdin closes)."""

from __future__ import annotations

import asyncio
import sys

from .http import Connection, request_head

BODY = b'{"inputs": [1, 2, 3]}'


async def hold(host: str, port: int, path: str, *, connections: int) -> int:
    """Returns the number of requests that failed."""
    head = request_head(
        "POST", path, {"Content-Type": "application/json", "Content-Length": str(len(BODY))}
    )
    opened = await asyncio.gather(*(Connection.open(host, port) for _ in range(connections)))
    statuses = await asyncio.gather(
        *(c.request(head, BODY) for c in opened), return_exceptions=True
    )
    failed = sum(1 for status in statuses if status != 200)
    print(f'{{"held": {len(opened)}, "failed": {failed}}}', flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for connection in opened:
        connection.close()
    return failed
