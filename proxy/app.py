"""Wires the parts into one proxy: the route table, admission of each request, the
model server's state as /health and /ready report it, and the metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import MutableSet
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

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
from .framing import RequestHead
from .headers import client_request_id
from .limiter import Limiter
from .local import LocalExchange
from .logs import AccessLog
from .metrics import CONTENT_TYPE, Gauges, Metrics
from .paths import RouteMap, split_target
from .protocol import ClientConnection, ConnectionLimits, Exchange
from .websocket import Timers, Tunnel

JSON = b"application/json"
ADMIN_PATHS = (b"/health", b"/ready", b"/metrics")


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
        self.access_log = AccessLog(settings.log_format) if settings.access_log else None
        self._metrics_key = self._api_key is not None and settings.metrics_require_api_key
        self.limiter = Limiter(
            max_concurrency=config.predict_concurrency,
            max_queue=settings.max_queue_size,
            queue_timeout=settings.queue_timeout_seconds,
        )
        self.pool = UpstreamPool("127.0.0.1", config.docker_server.server_port)
        # any mutable set: the tests pass one that says when a connection comes or goes
        self.connections: MutableSet[ClientConnection] = set()
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

    def connection(self) -> ClientConnection:
        return ClientConnection(self.route, self.connections, self.limits)

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
        )

    def _not_found(self, head: RequestHead, conn: ClientConnection) -> Exchange:
        """Counted (route "none") and logged: /v1/... instead of /sync/v1/... is the most
        common first mistake, and its user must be able to see it."""
        request_id = client_request_id(head)
        method = head.method.decode()
        self.metrics.not_found(method)
        self._log_access("none", method, head, 404, request_id, 0.0, 0.0)

        return LocalExchange.error(conn, head, NotFound(), request_id=request_id)

    def _rejection(self, head: RequestHead) -> ProxyError | None:
        if self._api_key is not None and not self._authorized(head):
            return Unauthorized()
        if self.closed:
            return Draining()
        if not self.state.ready:
            return NotReady()
        return None

    def _authorized(self, head: RequestHead) -> bool:
        """`Authorization: Bearer <key>` or `Api-Key <key>`, compared in constant time."""
        assert self._api_key is not None
        scheme, _, credentials = (head.header(b"authorization") or b"").strip().partition(b" ")
        if scheme.lower() not in (b"bearer", b"api-key"):
            return False
        return hmac.compare_digest(credentials.strip(), self._api_key)

    def _admin(self, head: RequestHead, conn: ClientConnection, path: bytes) -> Exchange:
        if head.method not in (b"GET", b"HEAD"):
            error = MethodNotAllowed()
            headers = [(b"Content-Type", JSON), (b"Allow", b"GET, HEAD")]
            return LocalExchange.fixed(conn, head, error.status, headers, error.body())
        if path == b"/metrics":
            if self._metrics_key and not self._authorized(head):
                return LocalExchange.error(conn, head, Unauthorized())  # not counted
            return LocalExchange(
                conn, head, lambda: (200, [(b"Content-Type", CONTENT_TYPE)], self.metrics.render())
            )
        return LocalExchange(conn, head, lambda: self._probe_answer(path))

    def _probe_answer(self, path: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        # /health: a model server process runs; /ready: it takes traffic and we are not draining
        ok = self.state.running if path == b"/health" else self.state.ready and not self.draining
        return 200 if ok else 503, [(b"Content-Type", JSON)], self._status(ok)

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

    def _count_messages(self, direction: str, count: int) -> None:
        self.metrics.websocket_messages[direction] += count

    def _finished(self, exchange: ProxyExchange) -> None:
        if exchange.code != 101:
            self._http_done()
        if exchange.disconnect is not None:
            self.metrics.client_disconnects[exchange.disconnect] += 1
        arrived = exchange.arrived_at
        self._record(
            exchange.route,
            exchange.head,
            exchange.code,
            request_id=exchange.request_id,
            duration=time.monotonic() - arrived,
            first_byte=None if exchange.first_byte_at is None else exchange.first_byte_at - arrived,
            queue_wait=None
            if exchange.admitted_at is None or exchange.queued_at is None
            else exchange.admitted_at - exchange.queued_at,
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
        self._log_access(route, method, head, code, request_id, duration, first_byte)

    def _log_access(
        self,
        route: str,
        method: str,
        head: RequestHead,
        code: int,
        request_id: bytes,
        duration: float,
        first_byte: float | None,
    ) -> None:
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
