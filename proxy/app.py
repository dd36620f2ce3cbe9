"""Wires the parts into one proxy: the route table (HTTP/1.1 and HTTP/2), admission of each
request and gRPC call, the model server's state as /health and /ready report it, and the
metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import MutableSet
from dataclasses import dataclass, field
from typing import cast

from prometheus_client import CollectorRegistry

from . import grpc_status
from .config import Config, read_secret
from .errors import (
    BadRequest,
    Draining,
    MethodNotAllowed,
    NotFound,
    NotReady,
    ProxyError,
    Unauthorized,
)
from .events import SSE, ResponseScanner, response_kind
from .forward import ProxyExchange
from .framing import Headers, RequestHead
from .grpc_call import GrpcCall
from .grpc_upstream import GrpcUpstream
from .h2server import H2Request, H2ServerConnection, LocalResponse, StreamHandler
from .headers import client_request_id, new_request_id, valid_request_id
from .limiter import Limiter
from .local import Answer, DeferredExchange, LocalExchange, error_headers
from .logs import AccessLog
from .metrics import CONTENT_TYPE, Gauges, Metrics
from .paths import RouteMap, split_target
from .protocol import ClientConnection, ConnectionLimits, Exchange
from .sniff import Sniffer
from .upstream import UpstreamPool
from .upstream_metrics import UpstreamMetrics, exposed_names
from .websocket import Timers, Tunnel

JSON = b"application/json"
ADMIN_PATHS = (b"/health", b"/ready", b"/metrics")
# the refusals counted in model_proxy_rejected_requests_total, whichever protocol
REJECTIONS = frozenset({"unauthorized", "not_ready", "draining", "queue_full", "queue_timeout"})


@dataclass
class UpstreamState:
    """The model server as the proxy knows it; /health and /ready report it."""

    phase: str = "starting"  # starting | ready | unready | restarting | stopped
    pid: int | None = None
    restarts: int = 0
    since: float = field(default_factory=time.time)

    def enter(self, phase: str, pid: int | None) -> None:
        """`pid` is the model server's process, None while none runs."""
        self.phase = phase
        self.pid = pid
        self.since = time.time()

    @property
    def ready(self) -> bool:
        return self.phase == "ready"

    @property
    def running(self) -> bool:
        return self.pid is not None


class Proxy:
    """Everything a request needs, and the protocol factory for the listener."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        settings = config.proxy
        self.limits = ConnectionLimits(  # for each new client connection
            header_timeout=settings.client_header_timeout_seconds,
            body_timeout=settings.client_body_timeout_seconds,
            send_timeout=settings.client_send_timeout_seconds,
            idle_timeout=settings.keepalive_timeout_seconds,
        )
        self.state = UpstreamState()
        self.routes = RouteMap(config.docker_server.predict_endpoint)
        self._api_key = (
            read_secret(config, settings.api_key_secret).encode()
            if settings.api_key_secret
            else None
        )
        self.access_log = (
            AccessLog(settings.log_format, config.model_name) if settings.access_log else None
        )
        self._metrics_key = self._api_key is not None and settings.metrics_require_api_key
        self.limiter = Limiter(
            max_concurrency=config.predict_concurrency,
            max_queue=settings.max_queue_size,
            queue_timeout=settings.queue_timeout_seconds,
        )
        self.pool = UpstreamPool("127.0.0.1", config.docker_server.server_port)
        grpc_port = config.grpc_port
        self.grpc_upstream = GrpcUpstream("127.0.0.1", grpc_port) if grpc_port else None
        # any mutable set: the tests pass one that says when a connection comes or goes
        self.connections: MutableSet[ClientConnection] = set()
        self.h2_connections: set[H2ServerConnection] = set()
        self.sniffing: set[Sniffer] = set()  # connections whose protocol is not known yet
        self.tunnels: set[Tunnel] = set()
        self._tunnel_timers = Timers(
            idle_timeout=settings.websocket_idle_timeout_seconds,
            ping_interval=config.transport.ping_interval_seconds,
            ping_timeout=config.transport.ping_timeout_seconds,
        )
        self.no_tunnels = asyncio.Event()
        self.no_tunnels.set()
        self.metrics = Metrics(
            registry or CollectorRegistry(auto_describe=True),
            Gauges(
                in_flight=lambda: self.limiter.in_flight,
                queued=lambda: self.limiter.queued,
                upstream_ready=lambda: self.state.ready,
                websockets=lambda: len(self.tunnels),
                concurrency_limit=lambda: self.limiter.max_concurrency,
            ),
        )
        self.upstream_metrics: UpstreamMetrics | None = None
        if settings.upstream_metrics_endpoint:
            port = settings.upstream_metrics_port or config.docker_server.server_port
            self.upstream_metrics = UpstreamMetrics(
                f"http://127.0.0.1:{port}{settings.upstream_metrics_endpoint}",
                reserved=exposed_names(self.metrics.render().decode()),
            )
        self.draining = False  # /ready answers 503
        self.closed = False  # the listener is closed: late requests get 503 draining
        self.last_request_at = 0.0
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def start_draining(self) -> None:
        self.draining = True

    def connection(self) -> asyncio.Protocol:
        """The listener's protocol: the first bytes choose HTTP/1.1 or HTTP/2."""
        return Sniffer(self._http1, self._http2, self.limits.header_timeout, self.sniffing)

    def _http1(self) -> ClientConnection:
        return ClientConnection(self.route, self.connections, self.limits)

    def _http2(self) -> H2ServerConnection:
        return H2ServerConnection(
            self.route_h2,
            self.h2_connections,
            idle_timeout=self.limits.idle_timeout,
            send_timeout=self.limits.send_timeout,
            body_timeout=self.limits.body_timeout,
        )

    # -- routing ----------------------------------------------------------------------

    def route(self, head: RequestHead, conn: ClientConnection) -> Exchange:
        split = split_target(head.target)
        if split is None:
            return LocalExchange.error(conn, head, BadRequest("unsupported request target"))
        path, query = split
        if path in ADMIN_PATHS:
            return self._admin(head, conn, path)
        mapped = self.routes.upstream_target(path, query)
        if mapped is None:
            return self._not_found(head, conn)
        route, target = mapped
        self.last_request_at = conn.loop.time()
        rejection = self._rejection(head)
        if rejection is not None:
            # refused before forwarding, but identified all the same, as a forwarded one is
            request_id = client_request_id(head)
            self._count_rejection(route, head, rejection, request_id)
            return LocalExchange.error(
                conn, head, rejection, close=self.closed, request_id=request_id
            )
        self._started()
        settings = self.config.proxy
        return ProxyExchange(
            conn,
            head,
            route=route,
            target=target,
            pool=self.pool,
            admission=self.limiter,
            outcome=self._finished,
            max_body=settings.max_request_body_bytes,
            buffer_body=settings.buffer_request_body_bytes,
            request_timeout=settings.request_timeout_seconds,
            on_upgrade=self._upgraded,
            scan=self._scanner,
        )

    def _not_found(self, head: RequestHead, conn: ClientConnection) -> Exchange:
        """Counted (route "none") and logged: /v1/... instead of /sync/v1/... is the most
        common first mistake, and its user must be able to see it."""
        request_id = client_request_id(head)
        method = head.method.decode()
        self.metrics.not_found(method)
        self._log_access("none", method, head, 404, request_id, Timings(0.0, first_byte=0.0))

        return LocalExchange.error(conn, head, NotFound(), request_id=request_id)

    def _rejection(self, head: RequestHead) -> ProxyError | None:
        # the header is only looked for when a key is set: this runs for every request
        if self._api_key is not None and not self._authorized(head.header(b"authorization")):
            return Unauthorized()
        return self._unavailable()

    def _unavailable(self) -> ProxyError | None:
        """Why no request or call can be taken now (draining, not ready), if so."""
        if self.closed:
            return Draining()
        if not self.state.ready:
            return NotReady()
        return None

    def _authorized(self, authorization: bytes | None) -> bool:
        """`Authorization: Bearer <key>` or `Api-Key <key>`, compared in constant time."""
        assert self._api_key is not None
        scheme, _, credentials = (authorization or b"").strip().partition(b" ")
        if scheme.lower() not in (b"bearer", b"api-key"):
            return False
        return hmac.compare_digest(credentials.strip(), self._api_key)

    def _admin(self, head: RequestHead, conn: ClientConnection, path: bytes) -> Exchange:
        method, authorization = head.method, head.header(b"authorization")
        if (
            path == b"/metrics"
            and self.upstream_metrics is not None
            and method in (b"GET", b"HEAD")
            and not (self._metrics_key and not self._authorized(authorization))
        ):
            return DeferredExchange(conn, head, self._scrape)
        # rendered in its turn: a pipelined burst of scrapes must not pile up answers
        return LocalExchange(conn, head, lambda: self._admin_answer(method, path, authorization))

    def _admin_answer(
        self, method: bytes, path: bytes, authorization: bytes | None
    ) -> tuple[int, Headers, bytes]:
        """/health, /ready or /metrics, whichever protocol asked."""
        if method not in (b"GET", b"HEAD"):
            error: ProxyError = MethodNotAllowed()
            return error.status, [(b"Content-Type", JSON), (b"Allow", b"GET, HEAD")], error.body()
        if path == b"/metrics":
            if self._metrics_key and not self._authorized(authorization):
                error = Unauthorized()  # not counted
                return error.status, error_headers(error), error.body()
            return 200, [(b"Content-Type", CONTENT_TYPE)], self.metrics.render()
        # /health: a model server process runs; /ready: it takes traffic and we are not draining
        ok = self.state.running if path == b"/health" else self.state.ready and not self.draining
        return 200 if ok else 503, [(b"Content-Type", JSON)], self._status(ok)

    async def _scrape(self) -> Answer:
        """The proxy's metrics, and the model server's after them when they could be had."""
        assert self.upstream_metrics is not None
        families = await self.upstream_metrics.families()
        self.metrics.upstream_metrics_up = families is not None
        return 200, [(b"Content-Type", CONTENT_TYPE)], self.metrics.render() + (families or b"")

    # -- HTTP/2 -----------------------------------------------------------------------

    def route_h2(self, request: H2Request, conn: H2ServerConnection) -> StreamHandler:
        path, _, query = request.path.partition(b"?")
        if path in ADMIN_PATHS:
            status, headers, body = self._admin_answer(request.method, path, request.authorization)
            head_only = request.method == b"HEAD"
            return LocalResponse(conn, request.stream_id, status, headers, body, head_only)
        if request.grpc:
            return self._grpc_call(request, conn)
        error: ProxyError = NotFound()
        if self.routes.upstream_target(path, query) is not None:
            # REST goes to the model server over HTTP/1.1 only (see the README's gRPC section)
            error = BadRequest(
                "HTTP/2 carries gRPC calls and /health, /ready, /metrics here:"
                " send REST requests over HTTP/1.1"
            )
        headers = error_headers(error)
        return LocalResponse(conn, request.stream_id, error.status, headers, error.body())

    def _grpc_call(self, request: H2Request, conn: H2ServerConnection) -> GrpcCall:
        self.last_request_at = conn.loop.time()
        upstream = self.grpc_upstream
        call = GrpcCall(
            conn,
            request,
            upstream=upstream,
            admission=self.limiter,
            request_timeout=self.config.proxy.request_timeout_seconds,
            on_finish=self._grpc_finished,
            on_messages=self._count_grpc_messages,
        )
        self._started()
        refusal = self._unavailable()
        if self._api_key is not None and not self._authorized(request.authorization):
            call.fail(Unauthorized())
        elif upstream is None:
            call.refuse(
                grpc_status.UNIMPLEMENTED,
                "no gRPC upstream: set runtime.transport.kind grpc or proxy.grpc_upstream_port",
            )
        elif refusal is not None:
            call.fail(refusal)
        else:
            call.start()
        return call

    def _status(self, ok: bool) -> bytes:
        state = self.state
        return json.dumps(
            {
                "ok": ok,
                "state": "draining" if self.draining else state.phase,
                "model": self.config.model_name,
                "pid": state.pid,
                "restarts": state.restarts,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.since)),
            }
        ).encode()

    # -- accounting -------------------------------------------------------------------

    def _started(self) -> None:
        self.active += 1
        self.idle.clear()

    def _http_done(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()

    def _upgraded(
        self,
        exchange: ProxyExchange,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        from_client: bytes,
        from_upstream: bytes,
    ) -> None:
        # a WebSocket is no longer an HTTP request in flight: the drain closes it with 1001
        self._http_done()

        def closed(tunnel: Tunnel) -> None:
            self.tunnels.discard(tunnel)
            if not self.tunnels:
                self.no_tunnels.set()
            exchange.tunnel_closed()

        tunnel = Tunnel(
            client,
            upstream,
            on_messages=self._count_messages,
            on_closed=closed,
            timers=self._tunnel_timers,
        )

        self.tunnels.add(tunnel)
        self.no_tunnels.clear()
        tunnel.start(from_client, from_upstream)

    def _scanner(self, exchange: ProxyExchange, headers: Headers) -> ResponseScanner | None:
        """Event streams are timed and JSON bodies read for token usage as they pass."""
        kind = response_kind(headers)
        if kind is None:
            return None
        metrics, route = self.metrics, exchange.route
        return ResponseScanner(
            sse=kind == SSE,
            arrived_at=exchange.arrived_at,
            first=metrics.time_to_first_event[route],
            gaps=metrics.inter_event[route],
        )

    def _count_messages(self, direction: str, count: int) -> None:
        self.metrics.websocket_messages[direction] += count

    def _count_grpc_messages(self, direction: str, count: int) -> None:
        self.metrics.grpc_messages[direction] += count

    def _grpc_finished(self, call: GrpcCall) -> None:
        self._http_done()
        if call.disconnect is not None:
            self.metrics.client_disconnects[call.disconnect] += 1
        arrived = call.arrived_at
        duration = time.monotonic() - arrived
        first_byte = None if call.first_byte_at is None else call.first_byte_at - arrived
        status = grpc_status.name(call.status)
        request = call.request
        method = request.method.decode("latin-1")
        self.metrics.request_finished(
            "grpc",
            method,
            call.code,
            duration=duration,
            time_to_first_byte=first_byte,
            queue_wait=None if call.admitted_at is None else call.admitted_at - arrived,
            rejected=call.error_kind if call.error_kind in REJECTIONS else None,
        )
        self.metrics.grpc_call_finished(status)
        if self.access_log is None:
            return
        chosen = request.request_id
        if chosen is None or not valid_request_id(chosen):
            chosen = new_request_id()
        request_id = chosen.decode("latin-1")
        path = request.path.decode("latin-1")
        duration_ms = round(duration * 1000, 3)
        self.access_log.add(
            '%s "%s %s HTTP/2" %d grpc-status=%s %.1fms id=%s',
            (request.client_ip, method, path, call.code, status, duration_ms, request_id),
            {
                "request_id": request_id,
                "client": request.client_ip,
                "route": "grpc",
                "method": method,
                "path": path,
                "status": call.code,
                "grpc_status": status,
                "duration_ms": duration_ms,
                "ttfb_ms": None if first_byte is None else round(first_byte * 1000, 3),
            },
        )

    def _finished(self, exchange: ProxyExchange) -> None:
        if exchange.code != 101:
            self._http_done()
        if exchange.disconnect is not None:
            self.metrics.client_disconnects[exchange.disconnect] += 1
        arrived = exchange.arrived_at
        sent, answered = exchange.sent_at, exchange.first_byte_at
        scanner = cast("ResponseScanner | None", exchange.scanner)  # made by _scanner
        first_event = events = None
        if scanner is not None:
            if (usage := scanner.usage()) is not None:
                self.metrics.count_tokens(*usage)
            if scanner.first_event_at is not None:
                first_event, events = scanner.first_event_at - arrived, scanner.events
        admitted, queued = exchange.admitted_at, exchange.queued_at
        timings = Timings(
            time.monotonic() - arrived,
            first_byte=None if answered is None else answered - arrived,
            queue_wait=None if admitted is None or queued is None else admitted - queued,
            upstream=None if sent is None or answered is None else answered - sent,
            first_event=first_event,
            events=events,
        )
        rejected = exchange.error_kind if exchange.code in (413, 503) else None
        self._record(
            exchange.route, exchange.head, exchange.code, exchange.request_id, timings, rejected
        )

    def _count_rejection(
        self, route: str, head: RequestHead, error: ProxyError, request_id: bytes
    ) -> None:
        self._record(
            route, head, error.status, request_id, Timings(0.0, first_byte=0.0), error.kind
        )

    def _record(
        self,
        route: str,
        head: RequestHead,
        code: int,
        request_id: bytes,
        timings: Timings,
        rejected: str | None,
    ) -> None:
        """Count a finished request, and write its access log line."""
        method = head.method.decode()
        self.metrics.request_finished(
            route,
            method,
            code,
            duration=timings.duration,
            time_to_first_byte=timings.first_byte,
            queue_wait=timings.queue_wait,
            rejected=rejected,
        )
        self._log_access(route, method, head, code, request_id, timings)

    def _log_access(
        self,
        route: str,
        method: str,
        head: RequestHead,
        code: int,
        request_id: bytes,
        timings: Timings,
    ) -> None:
        """One line, with, where they were seen, the queue wait, the model server's time to
        answer, and a stream's first event and event count."""
        if self.access_log is None:
            return
        path = head.target.partition(b"?")[0].decode("latin-1")  # a query may hold secrets
        duration_ms = _ms(timings.duration)
        first_byte, queue_wait, upstream = timings.first_byte, timings.queue_wait, timings.upstream
        first_event, events = timings.first_event, timings.events
        fields: dict[str, object] = {
            "request_id": request_id.decode("latin-1"),
            "client": head.client_ip,
            "route": route,
            "method": method,
            "path": path,
            "status": code,
            "duration_ms": duration_ms,
            "ttfb_ms": _ms(first_byte),
            "queue_ms": _ms(queue_wait),
            "upstream_ms": _ms(upstream),
        }
        message = '%s "%s %s" %d %.1fms'
        args: tuple[object, ...] = (head.client_ip, method, path, code, duration_ms)
        if queue_wait is not None:
            message += " queue=%.1fms"
            args += (fields["queue_ms"],)
        if upstream is not None:
            message += " upstream=%.1fms"
            args += (fields["upstream_ms"],)
        if first_event is not None:
            fields["ttfe_ms"] = _ms(first_event)
            fields["events"] = events
            message += " ttfe=%.1fms events=%d"
            args += (fields["ttfe_ms"], events)
        self.access_log.add(f"{message} id=%s", (*args, fields["request_id"]), fields)


@dataclass(frozen=True, slots=True)
class Timings:
    """One finished request's times, in seconds, for the histograms and the access log."""

    duration: float
    first_byte: float | None = None
    queue_wait: float | None = None  # waiting for a slot
    upstream: float | None = None  # request sent to the model server → its response head
    first_event: float | None = None  # a Server-Sent Events stream's first data event
    events: int | None = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)
