"""The proxy's Prometheus metrics: plain counters on the hot path, families built only
when `/metrics` is scraped, in a registry owned by the app."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .grpc_status import CODE_NAMES

# 1 ms to 10 min: LLM streams are long
BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# the gaps between a stream's events (tokens): finer where inter-token latency lives
EVENT_GAP_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
ROUTES = ("predict", "sync", "grpc")
DIRECTIONS = ("client_to_upstream", "upstream_to_client")
TOKEN_KINDS = ("prompt", "completion")
# how far a request or call had come when its client left (client_disconnects' label)
QUEUED, WAITING, STREAMING = DISCONNECT_PHASES = ("queued", "waiting", "streaming")
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Bucket counts without locks: the event loop is the only writer."""

    __slots__ = ("buckets", "counts", "total")

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        running = 0
        points: list[tuple[str, float]] = []
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += count
            points.append((bound, running))
        return points


class Gauges:
    """Read at scrape time, so they are exact at every moment."""

    def __init__(
        self,
        *,
        in_flight: Callable[[], int],
        queued: Callable[[], int],
        upstream_ready: Callable[[], bool],
        websockets: Callable[[], int],
        concurrency_limit: Callable[[], int],
    ) -> None:
        self.in_flight = in_flight
        self.queued = queued
        self.upstream_ready = upstream_ready
        self.websockets = websockets
        self.concurrency_limit = concurrency_limit


def disconnect_phase(*, admitted: bool, answered: bool) -> str:
    """The phase of a client that left: waiting for a slot, for the answer, or mid-answer."""
    if not admitted:
        return QUEUED
    return STREAMING if answered else WAITING


class Metrics(Collector):
    def __init__(self, registry: CollectorRegistry, gauges: Gauges) -> None:
        self.registry = registry  # the app's own: what /metrics renders
        self._gauges = gauges
        self.requests: dict[tuple[str, str, int], int] = {}
        self.rejected: dict[str, int] = {}
        self.restarts = 0
        self.websocket_messages = dict.fromkeys(DIRECTIONS, 0)
        self.client_disconnects = dict.fromkeys(DISCONNECT_PHASES, 0)
        self.duration = {route: Histogram() for route in ROUTES}
        self.time_to_first_byte = {route: Histogram() for route in ROUTES}
        self.queue_wait = Histogram()
        # Server-Sent Events: observed as each event passes (proxy/events.py)
        self.time_to_first_event = {route: Histogram() for route in ROUTES}
        self.inter_event = {route: Histogram(EVENT_GAP_BUCKETS) for route in ROUTES}
        self.tokens = dict.fromkeys(TOKEN_KINDS, 0)
        self.upstream_metrics_up = False  # the model server's metrics merged in this scrape
        # gRPC calls: by status (every name present from the start), messages by direction
        self.grpc_requests = dict.fromkeys(CODE_NAMES, 0)
        self.grpc_messages = dict.fromkeys(DIRECTIONS, 0)
        registry.register(self)
        ProcessCollector(registry=registry)  # process_*: CPU, memory, file descriptors

    def request_finished(
        self,
        route: str,
        method: str,
        code: int,
        *,
        duration: float,
        time_to_first_byte: float | None,
        queue_wait: float | None,
        rejected: str | None,
    ) -> None:
        key = (route, method, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.duration[route].observe(duration)
        if time_to_first_byte is not None:
            self.time_to_first_byte[route].observe(time_to_first_byte)
        if queue_wait is not None:
            self.queue_wait.observe(queue_wait)
        if rejected is not None:
            self.rejected[rejected] = self.rejected.get(rejected, 0) + 1

    def not_found(self, method: str) -> None:
        """The proxy's own 404, counted as route "none" (and in no latency histogram)."""
        key = ("none", method, 404)
        self.requests[key] = self.requests.get(key, 0) + 1

    def count_tokens(self, prompt: int, completion: int) -> None:
        self.tokens["prompt"] += prompt
        self.tokens["completion"] += completion

    def grpc_call_finished(self, status: str) -> None:
        self.grpc_requests[status] += 1

    def render(self) -> bytes:

        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "model_proxy_requests",
            "Proxied requests by route, method and status code (499: client left).",
            labels=["route", "method", "code"],
        )
        for (route, method, code), count in sorted(self.requests.items()):
            requests.add_metric([route, method, str(code)], count)
        yield requests
        yield self._histograms(
            "model_proxy_request_duration_seconds",
            "Time from request arrival to the end of the response, queue included.",
            self.duration,
        )
        yield self._histograms(
            "model_proxy_time_to_first_byte_seconds",
            "Time from request arrival to the first byte of the response head.",
            self.time_to_first_byte,
        )
        queue_wait = HistogramMetricFamily(
            "model_proxy_queue_wait_seconds", "Time admitted requests waited for a slot."
        )
        queue_wait.add_metric([], self.queue_wait.cumulative(), self.queue_wait.total)
        yield queue_wait
        gauges = self._gauges
        yield GaugeMetricFamily(
            "model_proxy_requests_in_flight",
            "Requests holding a slot now.",
            value=gauges.in_flight(),
        )
        yield GaugeMetricFamily(
            "model_proxy_requests_queued", "Requests waiting for a slot now.", value=gauges.queued()
        )
        rejected = CounterMetricFamily(
            "model_proxy_rejected_requests",
            "Requests the proxy answered itself with an error, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self.rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected
        yield GaugeMetricFamily(
            "model_proxy_upstream_ready",
            "1 while the model server is ready for traffic.",
            value=1 if gauges.upstream_ready() else 0,
        )
        yield CounterMetricFamily(
            "model_proxy_upstream_restarts",
            "Restarts of the model server, whatever the cause.",
            value=self.restarts,
        )
        yield GaugeMetricFamily(
            "model_proxy_websocket_connections",
            "Open WebSocket connections.",
            value=gauges.websockets(),
        )
        messages = CounterMetricFamily(
            "model_proxy_websocket_messages",
            "WebSocket messages passed on, by direction.",
            labels=["direction"],
        )
        for direction, count in self.websocket_messages.items():
            messages.add_metric([direction], count)
        yield messages
        disconnects = CounterMetricFamily(
            "model_proxy_client_disconnects",
            "Clients that left before their response ended, by how far the request had come:"
            " queued (no slot yet), waiting (for the response head), streaming.",
            labels=["phase"],
        )
        for phase, count in self.client_disconnects.items():
            disconnects.add_metric([phase], count)
        yield disconnects
        yield GaugeMetricFamily(
            "model_proxy_concurrency_limit",
            "Requests allowed to hold a slot at once (predict_concurrency).",
            value=gauges.concurrency_limit(),
        )
        yield self._histograms(
            "model_proxy_time_to_first_event_seconds",
            "Server-Sent Events responses: time from request arrival to the first data event.",
            self.time_to_first_event,
        )
        yield self._histograms(
            "model_proxy_inter_event_seconds",
            "Server-Sent Events responses: time between consecutive data events.",
            self.inter_event,
        )
        tokens = CounterMetricFamily(
            "model_proxy_tokens",
            "Tokens reported by OpenAI-style usage objects in responses and streams, by kind.",
            labels=["kind"],
        )
        for kind, count in self.tokens.items():
            tokens.add_metric([kind], count)
        yield tokens
        yield GaugeMetricFamily(
            "model_proxy_upstream_metrics_up",
            "1 when the model server's own metrics were merged into this scrape.",
            value=1 if self.upstream_metrics_up else 0,
        )
        yield from self._grpc_families()

    def _grpc_families(self) -> Iterator[Metric]:
        calls = CounterMetricFamily(
            "model_proxy_grpc_requests",
            "gRPC calls by final status, the proxy's own refusals included.",
            labels=["grpc_code"],
        )
        for status, count in self.grpc_requests.items():
            calls.add_metric([status], count)
        yield calls
        messages = CounterMetricFamily(
            "model_proxy_grpc_messages",
            "gRPC messages passed on, by direction.",
            labels=["direction"],
        )
        for direction, count in self.grpc_messages.items():
            messages.add_metric([direction], count)
        yield messages

    @staticmethod
    def _histograms(name: str, documentation: str, by_route: dict[str, Histogram]) -> Metric:
        family = HistogramMetricFamily(name, documentation, labels=["route"])
        for route, histogram in by_route.items():
            family.add_metric([route], histogram.cumulative(), histogram.total)
        return family
