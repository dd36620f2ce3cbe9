"""The figures of a whole bench run: every run's raw numbers and the medians of the
repetitions of each scenario x target."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .measure import Run
from .scenarios import Scenario


@dataclass
class Results:
    meta: dict[str, Any]
    runs: list[Run]
    memory: dict[str, dict[str, float]]  # target -> idle_rss_mib, rss_256_idle_mib
    readiness: list[float]  # seconds, model-proxy: child ready -> /ready 200
    scenarios: Sequence[Scenario]


@dataclass
class Cell:
    """The medians of one scenario x target over its successful repetitions."""

    runs: int
    failed: int
    rate: float
    p50_ms: float | None
    p99_ms: float | None
    ttfc_p50_ms: float | None
    cpu_us: float | None  # the target's CPU per unit of work (request, event, MiB, echo)
    peak_rss_mib: float | None
    delivered: float | None
    batched: float | None
    errors: int
    # shares of CPU 0 (load generator) and CPU 1 (target, backend) that other work on the
    # machine took during the runs: noise
    foreign_cpu0: float | None
    foreign_cpu1: float | None
    loadgen_busy: float | None  # share of CPU 0 the load generator used: near 1, it is the limit


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def aggregate(runs: Sequence[Run]) -> dict[str, dict[str, Cell]]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.scenario, run.target), []).append(run)
    cells: dict[str, dict[str, Cell]] = {}
    for (scenario, target), group in groups.items():
        good = [r for r in group if r.measurement is not None]
        ms = [r.measurement for r in good if r.measurement is not None]
        cells.setdefault(scenario, {})[target] = Cell(
            runs=len(group),
            failed=len(group) - len(good),
            rate=_median([m.rate for m in ms]) or 0.0,
            p50_ms=_median([m.p50_ms for m in ms]),
            p99_ms=_median([m.p99_ms for m in ms]),
            ttfc_p50_ms=_median([m.ttfc_p50_ms for m in ms]),
            cpu_us=_median(
                [
                    r.proxy_cpu_s * 1e6 / r.measurement.count
                    for r in good
                    if r.measurement is not None and r.measurement.count and target != "direct"
                ]
            ),
            peak_rss_mib=_median([r.peak_rss_mib for r in good]),
            delivered=_median([m.delivered for m in ms]),
            batched=_median([m.batched for m in ms]),
            errors=sum(m.errors for m in ms),
            foreign_cpu0=_median([(r.foreign_cpu or {}).get(0) for r in group]),
            foreign_cpu1=_median([(r.foreign_cpu or {}).get(1) for r in group]),
            loadgen_busy=_median([r.loadgen_cpu_s / r.wall_s for r in good if r.wall_s]),
        )
    return cells
