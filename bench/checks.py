"""Issues 5 and 13's targets, checked one by one against the medians of a run (a
model-proxy build's figures against nginx tuned's or direct's), and issue 10's for gRPC."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from .figures import Cell, Results
from .targets import REFERENCE

MIB_PER_MB = 1e6 / 2**20


@dataclass
class Check:
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


class _Lookup:
    def __init__(self, cells: dict[str, dict[str, Cell]], proxy: str) -> None:
        self.cells = cells
        self.proxy = proxy  # the build under check: model-proxy or model-proxy-compiled

    def get(self, scenario: str, target: str) -> Cell | None:
        cell = self.cells.get(scenario, {}).get(target)
        return cell if cell is not None and cell.runs > cell.failed else None

    def ratio(
        self, scenario: str, field: Callable[[Cell], float | None], to: str = REFERENCE
    ) -> float | None:
        ours, theirs = self.get(scenario, self.proxy), self.get(scenario, to)
        if ours is None or theirs is None:
            return None
        a, b = field(ours), field(theirs)
        return a / b if a is not None and b else None

    def added(self, scenario: str, field: Callable[[Cell], float | None], to: str) -> float | None:
        ours, theirs = self.get(scenario, self.proxy), self.get(scenario, to)
        if ours is None or theirs is None:
            return None
        a, b = field(ours), field(theirs)
        return a - b if a is not None and b is not None else None


def _at_least(text: str, value: float | None, limit: float, fmt: str = "{:.2f}x") -> Check:
    if value is None:
        return Check(text, "not measured", None)
    return Check(text, fmt.format(value), value >= limit)


def _at_most(text: str, value: float | None, limit: float, fmt: str = "{:.2f}x") -> Check:
    if value is None:
        return Check(text, "not measured", None)
    return Check(text, fmt.format(value), value <= limit)


def checks(
    results: Results, cells: dict[str, dict[str, Cell]], proxy: str = "model-proxy"
) -> list[Check]:
    look = _Lookup(cells, proxy)

    def rate(c: Cell) -> float:
        return c.rate

    def cpu(c: Cell) -> float | None:
        return c.cpu_us

    def p50(c: Cell) -> float | None:
        return c.p50_ms

    def p99(c: Cell) -> float | None:
        return c.p99_ms

    def ttfc(c: Cell) -> float | None:
        return c.ttfc_p50_ms

    plus_ms = "{:+.3f} ms"
    out = [
        _at_most("CPU per small proxied request ≤ 1.5x nginx's (static, c64)",
                 look.ratio("post-static-c64", cpu), 1.5),
        _at_most("CPU per small proxied request ≤ 1.3x nginx's (Python backend, c64)",
                 look.ratio("post-python-c64", cpu), 1.3),
        _at_least("req/s on the static backend ≥ 0.7x nginx (c64)",
                  look.ratio("post-static-c64", rate), 0.7),
        _at_least("Python backend: req/s ≥ 0.95x nginx's (c64)",
                  look.ratio("post-python-c64", rate), 0.95),
        _at_least("50 ms inference at c256: ≥ 0.92x direct",
                  look.ratio("infer-python-c256", rate, "direct"), 0.92),
        _at_most("added latency at c1: p50 ≤ 0.1 ms over nginx's",
                 look.added("post-static-c1", p50, REFERENCE), 0.1, plus_ms),
        _at_most("SSE: added time-to-first-chunk ≤ 0.2 ms at c1 (vs direct)",
                 look.added("sse-c1", ttfc, "direct"), 0.2, plus_ms),
        _at_most("SSE: added time-to-first-chunk ≤ 1 ms at c32 (vs direct)",
                 look.added("sse-c32", ttfc, "direct"), 1.0, plus_ms),
    ]  # fmt: skip
    ours, direct = look.get("sse-c32", proxy), look.get("sse-c32", "direct")
    if ours is None or direct is None or ours.batched is None or direct.batched is None:
        out.append(Check("SSE: no batching of events (c32)", "not measured", None))
    else:
        out.append(
            Check(
                "SSE: no batching of events (c32)",
                f"{ours.batched:.1%} of events read with the one before"
                f" (direct {direct.batched:.1%})",
                ours.batched <= direct.batched + 0.01,
            )
        )
    streams = look.get("sse-1000", proxy)
    if streams is None or streams.delivered is None:
        out.append(Check("1,000 streams: every event delivered", "not measured", None))
    else:
        out.append(
            Check(
                "1,000 streams: every event delivered",
                f"{streams.delivered:.2%}, {streams.errors} errors",
                streams.delivered >= 1.0 and streams.errors == 0,
            )
        )
    out += [
        _at_most("1,000 streams: added per-event p99 ≤ 5 ms (vs direct)",
                 look.added("sse-1000", p99, "direct"), 5.0, plus_ms),
        _at_most("1,000 streams: proxy RSS ≤ 150 MB",
                 streams.peak_rss_mib if streams else None, 150 * MIB_PER_MB, "{:.1f} MiB"),
        _at_most("1,000 streams: CPU per event ≤ 1.5x nginx's",
                 look.ratio("sse-1000", cpu), 1.5),
        _at_least("10 MiB upload ≥ 0.9x nginx's MiB/s", look.ratio("upload-10MiB", rate), 0.9),
        _at_least("10 MiB download ≥ 0.9x nginx's MiB/s", look.ratio("download-10MiB", rate), 0.9),
        _at_least("WebSocket c16 ≥ 0.9x nginx's msgs/s", look.ratio("ws-c16", rate), 0.9),
    ]  # fmt: skip
    memory = results.memory.get(proxy)
    if memory is None:
        out.append(Check("idle RSS ≤ 30 MB, flat at 256 connections", "not measured", None))
    else:
        idle, held = memory["idle_rss_mib"], memory["rss_256_idle_mib"]
        out.append(
            Check(
                "idle RSS ≤ 30 MB, flat at 256 connections (≤ +10 %)",
                f"{idle:.1f} MiB idle, {held:.1f} MiB with 256 ({held / idle - 1:+.0%})",
                idle <= 30 * MIB_PER_MB and held <= idle * 1.1,
            )
        )
    if results.readiness:
        worst = max(results.readiness)
        out.append(
            Check(
                "child becoming ready → /ready 200 within 100 ms",
                f"median {statistics.median(results.readiness) * 1000:.1f} ms, "
                f"max {worst * 1000:.1f} ms",
                worst <= 0.1,
            )
        )
    else:
        out.append(Check("child becoming ready → /ready 200 within 100 ms", "not measured", None))
    return out


def grpc_checks(cells: dict[str, dict[str, Cell]], proxy: str = "model-proxy") -> list[Check]:
    """Issue 10's targets: gRPC through model-proxy against nginx as Truss configures it for
    gRPC (nginx-docker: a new connection to the server per call) and with keep-alive."""
    look = _Lookup(cells, proxy)

    def rate(c: Cell) -> float:
        return c.rate

    out: list[Check] = []
    for scenario in ("grpc-unary-c64", "grpc-unary-c32"):
        width = scenario.rsplit("-", 1)[1]
        out += [
            _at_least(f"gRPC unary {width}: calls/s ≥ 1.0x nginx as Truss configures it",
                      look.ratio(scenario, rate, "nginx-docker"), 1.0),
            _at_least(f"gRPC unary {width}: calls/s ≥ 0.8x nginx with keep-alive",
                      look.ratio(scenario, rate), 0.8),
            _added_latency(look, scenario, f"gRPC unary {width}: added p50 / p99 over direct"),
        ]  # fmt: skip
    for scenario in ("grpc-stream-c64", "grpc-stream-c32"):
        width = scenario.rsplit("-", 1)[1]
        out += [
            _at_least(f"gRPC server streams {width}: messages/s ≥ 0.9x nginx with keep-alive",
                      look.ratio(scenario, rate), 0.9),
            _added_latency(look, scenario, f"gRPC server streams {width}: added p50 / p99 "
                           "per call over direct"),
        ]  # fmt: skip
    streams = look.get("grpc-streams-1000", proxy)
    out.append(
        _at_most(
            "1,000 open gRPC streams: proxy RSS ≤ 150 MB",
            streams.peak_rss_mib if streams else None,
            150 * MIB_PER_MB,
            "{:.1f} MiB",
        )
    )
    if streams is None:
        out.append(Check("1,000 open gRPC streams: every call ends OK", "not measured", None))
    else:
        out.append(
            Check(
                "1,000 open gRPC streams: every call ends OK",
                f"{streams.errors} errors",
                streams.errors == 0,
            )
        )
    return out


def _added_latency(look: _Lookup, scenario: str, text: str) -> Check:
    """What model-proxy adds to direct's p50 and p99 (reported, no target to meet)."""
    p50 = look.added(scenario, lambda c: c.p50_ms, "direct")
    p99 = look.added(scenario, lambda c: c.p99_ms, "direct")
    if p50 is None or p99 is None:
        return Check(text, "not measured", None)
    return Check(text, f"{p50:+.2f} ms / {p99:+.2f} ms", None)
