"""Wires the parts into one proxy: the route table (HTTP/1.1 and HTTP/2), admission of each
request and gRPC call, the model server's state as /health and /ready report it, and the
metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field

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
from .forward import ProxyExchange, UpstreamPool
from .grpc_call import GrpcCall
from .grpc_upstream import GrpcUpstream
from .h2server import H2Request, H2ServerConnection, LocalResponse, StreamHandler
from .headers import new_request_id
from .limiter import Limiter
from .logs import AccessLog
from .metrics import CONTENT_TYPE, Gauges, Metrics
from .paths import RouteMap, split_target
from .protocol import (
    ClientConnection,
    ConnectionLimits,
    Exchange,
    Headers,
    LocalExchange,
    RequestHead,
    error_headers,
)
from .sniff import Sniffer
from .websocket import Tunnel

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
        self.limits = ConnectionLimits()  # for each new client connection; tests shorten them
        settings = config.proxy
        self.state = UpstreamState()
        self.routes = RouteMap(config.docker_server.predict_endpoint)
        self._api_key = (
            read_secret(config, settings.api_key_secret).encode()
            if settings.api_key_secret
            else None
        )
        self.access_log = AccessLog(settings.log_format) if settings.access_log else None
        self._metrics_key = self._api_key is not None and settings.metrics_require_api_key
        self.limiter = Limiter(
            max_concurrency=config.predict_concurrency,
            max_queue=settings.max_queue_size,
            queue_timeout=settings.queue_timeout_seconds,
        )
        self.pool = UpstreamPool("127.0.0.1", config.docker_server.server_port)
        grpc_port = config.grpc_port
        self.grpc_upstream = GrpcUpstream("127.0.0.1", grpc_port) if grpc_port else None
        self.connections: set[ClientConnection] = set()
        self.h2_connections: set[H2ServerConnection] = set()
        self.sniffing: set[Sniffer] = set()  # connections whose protocol is not known yet
        self.tunnels: set[Tunnel] = set()
        self.no_tunnels = asyncio.Event()
        self.no_tunnels.set()
        self.metrics = Metrics(
            registry or CollectorRegistry(auto_describe=True),
            Gauges(
                in_flight=lambda: self.limiter.in_flight,
                queued=lambda: self.limiter.queued,
                upstream_ready=lambda: self.state.ready,
                websockets=lambda: len(self.tunnels),
            ),
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
            self.route_h2, self.h2_connections, idle_timeout=self.limits.idle_timeout
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
            return LocalExchange.error(conn, head, NotFound())
        route, target = mapped
        self.last_request_at = conn.loop.time()
        rejection = self._rejection(head)
        if rejection is not None:
            # refused before forwarding, but identified all the same, as a forwarded one is
            request_id = head.header(b"x-request-id") or new_request_id()
            self._count_rejection(route, head, rejection, request_id)
            return LocalExchange.error(
                conn, head, rejection, close=self.closed, request_id=request_id
            )
        self._started()
        settings = self.config.proxy
        websocket = head.upgrade and (head.header(b"upgrade") or b"").lower() == b"websocket"
        return ProxyExchange(
            conn,
            head,
            route=route,
            target=target,
            pool=self.pool,
            admission=self.limiter,
            outcome=self._finished,
            max_body=settings.max_request_body_bytes,
            request_timeout=settings.request_timeout_seconds,
            websocket=websocket,
            on_upgrade=self._upgraded,
        )

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
        status, headers, body = self._admin_answer(head.method, path, head.header(b"authorization"))
        return LocalExchange(conn, head, status, headers, body)

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

        tunnel = Tunnel(client, upstream, on_messages=self._count_messages, on_closed=closed)
        self.tunnels.add(tunnel)
        self.no_tunnels.clear()
        tunnel.start(from_client, from_upstream)

    def _count_messages(self, direction: str, count: int) -> None:
        self.metrics.websocket_messages[direction] += count

    def _count_grpc_messages(self, direction: str, count: int) -> None:
        self.metrics.grpc_messages[direction] += count

    def _grpc_finished(self, call: GrpcCall) -> None:
        self._http_done()
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
        request_id = (request.request_id or new_request_id()).decode("latin-1")
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
        arrived = exchange.arrived_at
        self._record(
            exchange.route,
            exchange.head,
            exchange.code,
            request_id=exchange.request_id,
            duration=time.monotonic() - arrived,
            first_byte=None if exchange.first_byte_at is None else exchange.first_byte_at - arrived,
            queue_wait=None if exchange.admitted_at is None else exchange.admitted_at - arrived,
            rejected=exchange.error_kind if exchange.code in (413, 503) else None,
        )

    def _count_rejection(
        self, route: str, head: RequestHead, error: ProxyError, request_id: bytes
    ) -> None:
        self._record(
            route,
            head,
            error.status,
            request_id=request_id,
            duration=0.0,
            first_byte=0.0,
            queue_wait=None,
            rejected=error.kind,
        )

    def _record(
        self,
        route: str,
        head: RequestHead,
        code: int,
        *,
        request_id: bytes,
        duration: float,
        first_byte: float | None,
        queue_wait: float | None,
        rejected: str | None,
    ) -> None:
        """Count a finished request, and write its access log line."""
        method = head.method.decode()
        self.metrics.request_finished(
            route,
            method,
            code,
            duration=duration,
            time_to_first_byte=first_byte,
            queue_wait=queue_wait,
            rejected=rejected,
        )
        if self.access_log is None:
            return
        path = head.target.partition(b"?")[0].decode("latin-1")  # a query may hold secrets
        duration_ms = round(duration * 1000, 3)
        first_byte_ms = None if first_byte is None else round(first_byte * 1000, 3)
        self.access_log.add(
            '%s "%s %s" %d %.1fms id=%s',
            (head.client_ip, method, path, code, duration_ms, request_id.decode("latin-1")),
            {
                "request_id": request_id.decode("latin-1"),
                "client": head.client_ip,
                "route": route,
                "method": method,
                "path": path,
                "status": code,
                "duration_ms": duration_ms,
                "ttfb_ms": first_byte_ms,
            },
        )
