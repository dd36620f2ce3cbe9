"""Probing the model server: one probe (mechanism) and the loops that turn probes into
readiness and liveness decisions (policy). Interval, deadline and clock are parameters."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from .errors import ProxyError
from .grpc_upstream import GrpcUpstream, UpstreamConnection
from .h2frames import Headers

Probe = Callable[[], Awaitable[bool]]
Clock = Callable[[], float]
Report = Callable[[str], None]  # what a probe saw, in words: "HTTP 503", "connection refused"


async def probe_http(
    host: str, port: int, path: str, timeout: float, report: Report | None = None
) -> bool:
    """True for a 2xx answer; any other status, a refused connection or a timeout is False.
    Only the status line is read (the connection is closed then): a probe needs no more, and
    no HTTP client library need be loaded for it."""
    request = b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (
        path.encode(),
        host.encode(),
        port,
    )
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            line = await reader.readuntil(b"\r\n")
    except TimeoutError:
        seen = f"no answer within {timeout:g} s"
    except asyncio.IncompleteReadError:
        seen = "the connection closed without an answer"
    except asyncio.LimitOverrunError:
        seen = "not an HTTP answer"
    except OSError as exc:
        seen = _os_error(exc)
    else:
        status = _status(line)
        seen = "not an HTTP answer" if status is None else f"HTTP {status}"
        if status is not None:
            if report is not None:
                report(seen)
            return 200 <= status < 300
    finally:
        if writer is not None:
            writer.close()
    if report is not None:
        report(seen)
    return False


def _status(line: bytes) -> int | None:
    """The status code of an HTTP/1.x status line."""
    version, _, rest = line.partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        return None
    return int(code)


async def probe_tcp(host: str, port: int, timeout: float, report: Report | None = None) -> bool:
    """True when the port accepts a TCP connection."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        seen = f"no connection within {timeout:g} s"
    except OSError as exc:
        seen = _os_error(exc)
    else:
        writer.close()
        if report is not None:
            report("connection accepted")
        return True
    if report is not None:
        report(seen)
    return False


def _os_error(exc: BaseException) -> str:
    """`connection refused` rather than the library's sentence around it."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


HEALTH_CHECK = b"/grpc.health.v1.Health/Check"
SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus
GRPC_OK, GRPC_UNIMPLEMENTED = 0, 12


async def probe_grpc(host: str, port: int, service: str, timeout: float) -> bool:
    """True when `grpc.health.v1.Health/Check` says SERVING for `service`, or when the server
    answers UNIMPLEMENTED (it has no health service: answering at all is being ready)."""
    try:
        async with asyncio.timeout(timeout):
            status, reply = await _unary_call(host, port, HEALTH_CHECK, _health_request(service))
    except (TimeoutError, ProxyError, ValueError):
        return False
    if status == GRPC_UNIMPLEMENTED:
        return True
    return status == GRPC_OK and _serving_status(reply) == SERVING


class _Reply:
    """One call's answer as its HTTP/2 stream delivers it (a ResponseSink)."""

    def __init__(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        self.stream_id = 0
        self.data = bytearray()
        self.status: int | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def response_headers(self, headers: Headers, end: bool) -> None:
        if end:  # trailers-only
            self._status(headers)

    def response_data(self, data: bytes) -> None:
        self.data += data
        self.connection.ack(self.stream_id, len(data))

    def response_trailers(self, headers: Headers) -> None:
        self._status(headers)

    def response_end(self) -> None:
        self._status([])

    def upstream_reset(self, code: int | None) -> None:
        if not self.done.done():
            self.done.set_exception(ValueError("the call was reset"))

    def request_sent(self, size: int) -> None:
        pass

    def _status(self, headers: Headers) -> None:
        self.status = _grpc_status(headers, None)
        if not self.done.done():
            self.done.set_result(None)


async def _unary_call(host: str, port: int, path: bytes, message: bytes) -> tuple[int, bytes]:
    """One gRPC call over its own h2c connection: its status and the reply's bytes (the
    messages with their prefixes)."""
    upstream = GrpcUpstream(host, port)
    try:
        connection = await upstream.connect()
        reply = _Reply(connection)
        reply.stream_id = connection.open_call(
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path),
                (b":authority", b"%s:%d" % (host.encode(), port)),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ],
            reply,
        )
        connection.send_data(reply.stream_id, b"\0" + len(message).to_bytes(4, "big") + message)
        connection.end_stream(reply.stream_id)
        await reply.done
    finally:
        upstream.close()
    if reply.status is None:
        raise ValueError("the answer had no grpc-status")
    return reply.status, bytes(reply.data)


def _grpc_status(headers: Headers, previous: int | None) -> int | None:
    for name, value in headers:
        if name == b"grpc-status" and value.isdigit():
            return int(value)
    return previous


def _health_request(service: str) -> bytes:
    """HealthCheckRequest{service = 1}, protobuf-encoded by hand: a tag and a string."""
    name = service.encode()
    return b"\x0a" + _varint(len(name)) + name if name else b""


def _serving_status(reply: bytes) -> int:
    """HealthCheckResponse.status (field 1, a varint) from the reply's first message."""
    message = reply[5 : 5 + int.from_bytes(reply[1:5], "big")]
    pos = 0
    while pos < len(message):
        tag, pos = _read_varint(message, pos)
        if tag & 7 == 0:
            value, pos = _read_varint(message, pos)
            if tag >> 3 == 1:
                return value
        elif tag & 7 == 2:  # a field of a newer version of the message: skipped
            length, pos = _read_varint(message, pos)
            pos += length
        else:
            raise ValueError("unexpected field in HealthCheckResponse")
    return 0  # UNKNOWN: the default, not encoded


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


async def wait_until_ready(probe: Probe, *, interval: float, deadline: float, clock: Clock) -> bool:
    """Probe every `interval` until one passes (True) or `deadline` on `clock` passes (False)."""
    while True:
        if await probe():
            return True
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(interval, remaining))


async def watch(
    probe: Probe,
    *,
    interval: float,
    threshold: float,
    on_change: Callable[[bool], None],
    clock: Clock,
) -> None:
    """Probe every `interval` forever; report False once probes have failed without a
    break for `threshold` seconds, and True again at the first success after that."""
    failing_since: float | None = None
    healthy = True
    while True:
        ok = await probe()
        now = clock()
        if ok:
            failing_since = None
            if not healthy:
                healthy = True
                on_change(True)
        else:
            if failing_since is None:
                failing_since = now
            if healthy and now - failing_since >= threshold:
                healthy = False
                on_change(False)
        await asyncio.sleep(interval)
