"""Server-Sent Events streams: time to the first event, each event's delay from the moment
the backend wrote it (its own `"t"` stamp) to the moment it was read here, and whether
events arrive one by one or held back and batched."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from .http import Connection, HttpError, request_head
from .stats import Measurement, ms

DONE = b"data: [DONE]"


@dataclass
class Tally:
    delays: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)
    events: int = 0
    batched: int = 0
    streams: int = 0
    errors: int = 0


class Stream:
    """One stream's parser: splits the body into events and records each one."""

    def __init__(self, tally: Tally, sent_at: float) -> None:
        self.tally = tally
        self.sent_at = sent_at
        self.buffer = b""
        self.last_read = -1

    def on_body(self, piece: bytes, read_at: float, read: int) -> None:
        self.buffer += piece
        *events, self.buffer = self.buffer.split(b"\n\n")
        tally = self.tally
        for event in events:
            if event == DONE:
                continue
            stamp = json.loads(event[len(b"data: ") :])["t"]
            if self.last_read < 0:
                tally.ttfc.append(read_at - self.sent_at)
            elif read == self.last_read:
                tally.batched += 1
            self.last_read = read
            tally.delays.append(read_at - stamp)
            tally.events += 1


async def _one_stream(connection: Connection, head: bytes, tally: Tally) -> None:
    stream = Stream(tally, time.time())
    status = await connection.request(head, on_body=stream.on_body)
    if status != 200:
        raise HttpError(f"status {status}")
    tally.streams += 1


async def run(
    host: str,
    port: int,
    path: str,
    *,
    concurrency: int,
    duration: float,
    events: int,
    once: bool,
    stagger: float = 0.0,
    grace: float = 30.0,
) -> Measurement:
    """`concurrency` connections; each runs streams one after another for `duration`
    seconds, or, with `once`, all connect first and then start one stream each together.
    A stream still open `grace` seconds after that counts as an error.

    Without `once`, the connections start one `stagger` apart, spread over one stream's
    length: streams then begin one by one, as requests arrive at a real server, instead
    of all together every time the previous ones end."""
    tally = Tally()
    head = request_head("GET", path, {"Accept": "text/event-stream"})
    connections = await asyncio.gather(*(Connection.open(host, port) for _ in range(concurrency)))
    started = time.monotonic()
    deadline = started + duration

    async def worker(index: int, connection: Connection) -> None:
        if not once:
            await asyncio.sleep(index * stagger)
        try:
            while True:
                await _one_stream(connection, head, tally)
                if once or time.monotonic() >= deadline:
                    return
        except HttpError:
            tally.errors += 1

    workers = [asyncio.create_task(worker(i, c)) for i, c in enumerate(connections)]
    _, unfinished = await asyncio.wait(workers, timeout=(0 if once else duration) + grace)
    for task in unfinished:
        task.cancel()
    tally.errors += len(unfinished)
    elapsed = time.monotonic() - started
    for connection in connections:
        connection.close()
    expected = (tally.streams + tally.errors) * events
    return Measurement(
        count=tally.events,
        elapsed=elapsed,
        p50_ms=ms(tally.delays, 50),
        p99_ms=ms(tally.delays, 99),
        errors=tally.errors,
        ttfc_p50_ms=ms(tally.ttfc, 50),
        ttfc_p99_ms=ms(tally.ttfc, 99),
        delivered=tally.events / expected if expected else None,
        batched=tally.batched / tally.events if tally.events else None,
    )
