"""Calls through the proxy between two strict HTTP/2 peers (the h2 library on both sides), as
properties over generated call streams: several calls at once on one client connection, with
metadata (`-bin` included, some large enough for CONTINUATION frames), messages cut into
DATA frames of any size (padded or not), trailers, resets at any point from either side,
PINGs, small windows and SETTINGS changes. For each call the model server receives exactly
what the client sent and the client exactly what the model server sent (a prefix of it, up
to a reset); no call's bytes reach another; neither peer ever sees a window exceeded or any
other protocol error; the proxy never holds more than a stream's window for a stream, and
lets go of every call and slot in the end."""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.app import Proxy
from proxy.h2conn import STREAM_WINDOW, H2Endpoint

from .h2peers import grpc_request
from .h2strict import SETTING_CODES, Seen, Side, StrictClient, StrictUpstream
from .test_grpc import grpc_proxy, port_of

SAFETY = 10.0
EXAMPLES = 150

token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=10)
names = token.map(lambda name: ("x-" + name).encode())
texts = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
values = st.one_of(
    texts.map(str.encode),
    st.tuples(texts, texts).map(lambda pair: f"{pair[0]} {pair[1]}".strip().encode()),
    st.just(b""),
)
binary = st.binary(max_size=40).map(lambda raw: base64.b64encode(raw).rstrip(b"="))


class Large(bytes):
    """A value large enough for HEADERS + CONTINUATION, shown short in a failing example."""

    def __repr__(self) -> str:
        return f"Large({len(self)})"


large = st.integers(17000, 40000).map(lambda size: Large(b"L" * size))
field = st.one_of(
    st.tuples(names, values),
    st.tuples(names.map(lambda name: name + b"-bin"), binary),
    st.tuples(names, large),
)


def fields(min_size: int) -> st.SearchStrategy[list[tuple[bytes, bytes]]]:
    return st.lists(field, min_size=min_size, max_size=4, unique_by=lambda pair: pair[0]).map(
        lambda found: found if sum(len(v) for _, v in found) < 50000 else found[:1]
    )


metadata = fields(0)
trailers = fields(1)  # an empty trailer block is no block at all
chunks = st.lists(
    st.tuples(
        st.one_of(st.binary(min_size=1, max_size=300), st.integers(1, 150000).map(Large)),
        st.sampled_from([0, 0, 0, 1, 16, 255]),
    ),
    max_size=5,
)
windows = st.sampled_from([None, 1024, 16384, 65535, 300000])


@dataclass
class Call:
    request: Side
    response: Side


def call_strategy(port: int) -> st.SearchStrategy[Callable[[bytes], Call]]:
    """A call, made whole once its x-call id is known."""

    def make(
        meta: list[tuple[bytes, bytes]],
        request_chunks: list[tuple[bytes, int]],
        request_trailers: list[tuple[bytes, bytes]] | None,
        client_reset: int | None,
        reply_meta: list[tuple[bytes, bytes]],
        reply_chunks: list[tuple[bytes, int]],
        reply_trailers: list[tuple[bytes, bytes]] | None,
        server_reset: tuple[int, int] | None,
        pings: frozenset[int],
    ) -> Callable[[bytes], Call]:
        def with_id(call_id: bytes) -> Call:
            request = Side(
                grpc_request(port, b"/test.Model/Call", *meta, (b"x-call", call_id)),
                request_chunks,
                request_trailers,
                reset_after=client_reset,
                pings=pings,
            )
            response = Side(
                [(b":status", b"200"), (b"content-type", b"application/grpc"), *reply_meta],
                reply_chunks,
                None if reply_trailers is None else [(b"grpc-status", b"0"), *reply_trailers],
                reset_after=None if server_reset is None else server_reset[0],
                reset_code=0x8 if server_reset is None else server_reset[1],
            )
            return Call(request, response)

        return with_id

    rare = st.integers(0, 5)  # a reset after this many chunks, in one call of four
    return st.builds(
        make,
        metadata,
        chunks,
        st.one_of(st.none(), st.none(), trailers),
        st.one_of(st.none(), st.none(), st.none(), rare),
        metadata,
        chunks,
        st.one_of(metadata, metadata, st.none()),
        st.one_of(st.none(), st.none(), st.none(), st.tuples(rare, st.sampled_from([0x2, 0x8]))),
        st.frozensets(st.integers(0, 4), max_size=2),
    )


@dataclass
class Example:
    calls: list[Callable[[bytes], Call]]
    client_window: int | None
    client_settings: dict[int, int]


def examples(port: int) -> st.SearchStrategy[Example]:
    codes = SETTING_CODES
    keys = [codes.INITIAL_WINDOW_SIZE, codes.HEADER_TABLE_SIZE, codes.MAX_FRAME_SIZE]
    # (from 1024: a window of 0 that h2 never reopens would stall the call)
    changes = st.dictionaries(st.sampled_from(keys), st.integers(1024, 1 << 20), max_size=2).map(
        lambda found: {
            key: max(value, 16384) if key == codes.MAX_FRAME_SIZE else value
            for key, value in found.items()
        }
    )
    return st.builds(
        Example, st.lists(call_strategy(port), min_size=1, max_size=5), windows, changes
    )


def check_call(call: Call, at_client: Seen, at_upstream: Seen | None) -> None:
    request, response = call.request, call.response
    if request.reset_after is None and response.reset_after is None:
        assert at_upstream is not None
        assert at_upstream.headers == request.headers
        assert bytes(at_upstream.data) == request.data
        assert at_upstream.trailers == request.trailers
        assert at_upstream.ended
        assert at_client.headers == response.headers
        assert bytes(at_client.data) == response.data
        assert at_client.trailers == response.trailers
        assert at_client.ended
        return
    # a reset on either side: each side got a prefix of what the other sent, then the reset
    if at_upstream is not None:
        assert at_upstream.headers == request.headers
        assert request.data.startswith(at_upstream.data)
        assert at_upstream.ended or at_upstream.reset_code is not None
    assert response.data.startswith(at_client.data)
    if request.reset_after is None:  # the model server reset it: the client is told so
        assert at_client.reset_code == response.reset_code
        assert at_client.trailers is None


class Bound:
    """Wraps the proxy's HTTP/2 send_data: no stream ever queues more than its window."""

    def __init__(self) -> None:
        self.largest = 0
        self.original = H2Endpoint.send_data

    def __enter__(self) -> Bound:
        original = self.original

        def send_data(endpoint: H2Endpoint, stream_id: int, data: bytes) -> None:
            original(endpoint, stream_id, data)
            self.largest = max(self.largest, endpoint.queued(stream_id))

        H2Endpoint.send_data = send_data  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        H2Endpoint.send_data = self.original  # type: ignore[method-assign]


async def play(proxy: Proxy, upstream: StrictUpstream, port: int, example: Example, ids: Any):
    client = await StrictClient.connect(port, window=example.client_window)
    try:
        calls = []
        for make in example.calls:
            call_id = b"%d" % next(ids)
            call = make(call_id)
            upstream.scripts[call_id] = call.response
            calls.append((call_id, call))
        running = [asyncio.ensure_future(client.call(call.request)) for _, call in calls]
        if example.client_settings:
            client.settings(example.client_settings)
        async with asyncio.timeout(SAFETY):
            at_client = await asyncio.gather(*running)
            for call_id, _ in calls:
                seen = upstream.calls.get(call_id)
                if seen is not None:
                    await seen.done.wait()
        assert not client.errors, client.errors
        assert not upstream.errors, upstream.errors
        for (call_id, call), seen in zip(calls, at_client, strict=True):
            check_call(call, seen, upstream.calls.get(call_id))
        async with asyncio.timeout(SAFETY):
            await client.all_ponged()
        assert client.pongs == client.pings  # every PING answered, none twice
    finally:
        await client.close()
    async with asyncio.timeout(SAFETY):
        await proxy.idle.wait()  # every call finished, its slot given back
    assert proxy.limiter.in_flight == 0
    assert proxy.grpc_upstream is not None
    for connection in proxy.grpc_upstream.connections:
        assert not connection.streams  # nothing left open at the model server


def test_calls_pass_exactly_between_strict_peers(tmp_path: Path) -> None:
    errors: list[dict[str, Any]] = []
    ids = itertools.count()
    count = 0
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner, Bound() as bound:
        stack = AsyncExitStack()

        async def start() -> tuple[StrictUpstream, Proxy, int]:
            asyncio.get_running_loop().set_exception_handler(lambda _, ctx: errors.append(ctx))
            upstream = await stack.enter_async_context(StrictUpstream(window=65535).serving())
            proxy, url = await stack.enter_async_context(
                grpc_proxy(tmp_path, upstream.port, concurrency=64)
            )
            return upstream, proxy, port_of(url)

        upstream, proxy, port = runner.run(start())

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(examples(port), windows)
        def calls_pass(example: Example, upstream_window: int | None) -> None:
            nonlocal count
            count += 1
            if upstream_window is not None:
                upstream.settings({SETTING_CODES.INITIAL_WINDOW_SIZE: upstream_window})
            runner.run(play(proxy, upstream, port, example, ids))
            assert not errors, errors

        try:
            calls_pass()
        finally:
            runner.run(stack.aclose())
    assert count >= EXAMPLES
    assert bound.largest <= STREAM_WINDOW
    assert not errors, errors
