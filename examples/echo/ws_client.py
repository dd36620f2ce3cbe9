"""A line-by-line WebSocket client for trying the proxy by hand: each line typed is sent as a
text message, and every message received is printed. aiohttp only (model-proxy's own
dependency), so it runs wherever the proxy is installed:

    python examples/echo/ws_client.py ws://localhost:8080/sync/ws

`--header "Authorization: Bearer KEY"` adds a header to the handshake (the proxy's API key,
when proxy.api_key_secret is set). Ctrl-D closes the connection (a reply still on its way
is not shown); the close code is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp


async def _print_messages(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for message in ws:
        if message.type is aiohttp.WSMsgType.TEXT:
            print(f"< {message.data}", flush=True)
        elif message.type is aiohttp.WSMsgType.BINARY:
            print(f"< ({len(message.data)} bytes) {message.data!r}", flush=True)


async def _send_lines(ws: aiohttp.ClientWebSocketResponse) -> None:
    # stdin read on the loop, not in a thread: when the server closes first, nothing is left
    # waiting for a line
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        await ws.send_str(line.decode().rstrip("\n"))


async def main(url: str, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(url, headers=headers)
        except aiohttp.WSServerHandshakeError as error:
            print(f"handshake refused: {error.status} {error.message}", file=sys.stderr)
            return 1
        async with ws:
            printer = asyncio.create_task(_print_messages(ws))
            sender = asyncio.create_task(_send_lines(ws))
            await asyncio.wait({printer, sender}, return_when=asyncio.FIRST_COMPLETED)
            if sender.done():  # end of input: close, and print what is still on its way
                await ws.close()
            await printer
            sender.cancel()
        print(f"closed with code {ws.close_code}", file=sys.stderr)
    return 0


def _header(text: str) -> tuple[str, str]:
    name, separator, value = text.partition(":")
    if not separator or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value' (got {text!r})")
    return name.strip(), value.strip()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="e.g. ws://localhost:8080/sync/ws")
    parser.add_argument("--header", type=_header, action="append", default=[], metavar="H")
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.url, dict(args.header))))
