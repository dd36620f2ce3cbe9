"""The report: medians of the repetitions, ratios to nginx tuned, the issue's targets
checked, as a Markdown table, a PNG chart and a JSON of every raw figure."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .loadgen.stats import Measurement
from .measure import Run
from .scenarios import BY_NAME, Scenario
from .targets import REFERENCE

MIB_PER_MB = 1e6 / 2**20
LOADGEN_BOUND = 0.85  # the load generator used this much of its CPU: it may be the limit
COLORS = {
    "direct": "#9e9e9e",
    "nginx-tuned": "#2e7d32",
    "nginx-docker": "#81c784",
    "model-proxy": "#1565c0",
}


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
    foreign_cpu1: float | None  # share of CPU 1 used by other work during the runs
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
            foreign_cpu1=_median([(r.foreign_cpu or {}).get(1) for r in group]),
            loadgen_busy=_median([r.loadgen_cpu_s / r.wall_s for r in good if r.wall_s]),
        )
    return cells


# -- the targets ------------------------------------------------------------------


@dataclass
class Check:
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


class _Lookup:
    def __init__(self, cells: dict[str, dict[str, Cell]]) -> None:
        self.cells = cells

    def get(self, scenario: str, target: str) -> Cell | None:
        cell = self.cells.get(scenario, {}).get(target)
        return cell if cell is not None and cell.runs > cell.failed else None

    def ratio(
        self, scenario: str, field: Callable[[Cell], float | None], to: str = REFERENCE
    ) -> float | None:
        ours, theirs = self.get(scenario, "model-proxy"), self.get(scenario, to)
        if ours is None or theirs is None:
            return None
        a, b = field(ours), field(theirs)
        return a / b if a is not None and b else None

    def added(self, scenario: str, field: Callable[[Cell], float | None], to: str) -> float | None:
        ours, theirs = self.get(scenario, "model-proxy"), self.get(scenario, to)
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


def checks(results: Results, cells: dict[str, dict[str, Cell]]) -> list[Check]:
    look = _Lookup(cells)

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
        _at_least("req/s on the static backend ≥ 0.7x nginx (c64)",
                  look.ratio("post-static-c64", rate), 0.7),
        _at_least("Python backend: req/s ≥ 0.95x nginx's (c64)",
                  look.ratio("post-python-c64", rate), 0.95),
        _at_least("50 ms inference at c256: ≥ 0.92x direct",
                  look.ratio("infer-python-c256", rate, "direct"), 0.92),
        _at_most("added latency at c1: p50 ≤ 0.1 ms over nginx's",
                 look.added("post-static-c1", p50, REFERENCE), 0.1, plus_ms),
        _at_most("SSE: added time-to-first-chunk ≤ 0.3 ms at c1 (vs direct)",
                 look.added("sse-c1", ttfc, "direct"), 0.3, plus_ms),
        _at_most("SSE: added time-to-first-chunk ≤ 1 ms at c32 (vs direct)",
                 look.added("sse-c32", ttfc, "direct"), 1.0, plus_ms),
    ]  # fmt: skip
    ours, direct = look.get("sse-c32", "model-proxy"), look.get("sse-c32", "direct")
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
    streams = look.get("sse-1000", "model-proxy")
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
    memory = results.memory.get("model-proxy")
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


# -- Markdown -----------------------------------------------------------------------------


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def _row(scenario: Scenario, target: str, cell: Cell, ref: Cell | None, direct: Cell | None) -> str:
    if cell.runs == cell.failed:
        return f"| {scenario.name} | {target} | failed ({cell.failed} runs) |" + " |" * 9
    ttfc = _num(cell.ttfc_p50_ms, "{:.2f}")
    if cell.ttfc_p50_ms is not None and direct is not None and direct.ttfc_p50_ms is not None:
        ttfc += f" ({cell.ttfc_p50_ms - direct.ttfc_p50_ms:+.2f})" if target != "direct" else ""
    notes = []
    if cell.delivered is not None:
        notes.append(f"delivered {cell.delivered:.1%}")
    if cell.batched is not None:
        notes.append(f"batched {cell.batched:.1%}")
    if cell.errors:
        notes.append(f"{cell.errors} errors")
    if cell.failed:
        notes.append(f"{cell.failed} of {cell.runs} runs failed")
    if cell.loadgen_busy is not None and cell.loadgen_busy >= LOADGEN_BOUND:
        notes.append(f"load generator at {cell.loadgen_busy:.0%} CPU")
    cpu_unit = "µs/" + scenario.unit
    return (
        f"| {scenario.name} | {target} | {cell.rate:,.0f} {scenario.unit}/s "
        f"| {_ratio(cell.rate, ref.rate if ref else None)} "
        f"| {_num(cell.p50_ms)} | {_num(cell.p99_ms)} | {ttfc} "
        f"| {_num(cell.cpu_us, '{:.1f} ' + cpu_unit)} "
        f"| {_ratio(cell.cpu_us, ref.cpu_us if ref else None)} "
        f"| {_num(cell.peak_rss_mib, '{:.1f}')} "
        f"| {_ratio(cell.peak_rss_mib, ref.peak_rss_mib if ref else None)} "
        f"| {', '.join(notes)} |"
    )


def markdown(results: Results, cells: dict[str, dict[str, Cell]], found: list[Check]) -> str:
    meta = results.meta
    lines = [
        f"# model-proxy side by side with nginx — {meta['date']}",
        "",
        f"{meta['reps']} repetition(s) of {meta['duration_s']:g} s per run, interleaved; "
        f"medians. {meta['machine']}, Python {meta['python']}. Load generator on CPU 0, "
        f"target and backend on CPU 1. Whole run: {meta['runtime_s']:.0f} s"
        + (" (`--quick`)." if meta["quick"] else "."),
    ]
    noise = [r.foreign_cpu.get(1, 0.0) for r in results.runs if r.foreign_cpu]
    if noise:
        lines += [
            "",
            f"Other work on the machine took {statistics.median(noise):.0%} of CPU 1 during "
            f"the median run ({max(noise):.0%} at worst): figures from a busy machine are noisy.",
        ]
    lines += ["", "## Issue 5 targets (model-proxy)", "", "| target | measured | met |",
              "| --- | --- | --- |"]  # fmt: skip
    mark = {True: "yes", False: "**no**", None: "-"}
    lines += [f"| {c.target} | {c.measured} | {mark[c.met]} |" for c in found]
    lines += [
        "",
        "## Every figure",
        "",
        "rate: units of work per second; vs nginx: ratio to nginx tuned; p50/p99: latency of a "
        "request, a 10 MiB transfer or a WebSocket echo, and for SSE each event's delay from the "
        "backend writing it to the client reading it; TTFC: request sent → first event "
        "(added over direct in brackets); CPU: the target's processes' CPU time (user + system, "
        "from /proc) per unit; peak RSS: VmHWM over the run (nginx: master + worker).",
        "",
        "| scenario | target | rate | vs nginx | p50 ms | p99 ms | TTFC ms | CPU | vs nginx "
        "| peak RSS MiB | vs nginx | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for scenario in results.scenarios:
        row = cells.get(scenario.name, {})
        for target in results.meta["targets"]:
            if target in row:
                lines.append(
                    _row(scenario, target, row[target], row.get(REFERENCE), row.get("direct"))
                )
    lines += ["", "## Memory at rest and readiness", "",
              "| target | RSS idle MiB | RSS with 256 idle connections MiB |",
              "| --- | ---: | ---: |"]  # fmt: skip
    for target, memory in results.memory.items():
        lines.append(
            f"| {target} | {memory['idle_rss_mib']:.1f} | {memory['rss_256_idle_mib']:.1f} |"
        )
    if results.readiness:
        samples = ", ".join(f"{s * 1000:.1f}" for s in results.readiness)
        lines += [
            "",
            f"model-proxy, the model server reporting ready (/health 200) → /ready 200: "
            f"median {statistics.median(results.readiness) * 1000:.1f} ms (samples: {samples} ms; "
            "/ready polled every 2 ms).",
        ]
    return "\n".join(lines) + "\n"


# -- chart --------------------------------------------------------------------------------


def chart(results: Results, cells: dict[str, dict[str, Cell]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in results.scenarios if s.name in cells]
    targets = list(results.meta["targets"])
    fig, axes = plt.subplots(2, 2, figsize=(16, 10))
    fig.suptitle(
        f"model-proxy side by side with nginx — {results.meta['date']} "
        f"({results.meta['reps']} x {results.meta['duration_s']:g} s, medians)"
    )

    def bars(
        ax: Any,
        shown: list[str],
        value: Callable[[str, str], float | None],
        clip: float | None = None,
    ) -> None:
        """Grouped bars; with `clip`, taller bars are cut there and carry their value."""
        width = 0.8 / max(len(shown), 1)
        for i, target in enumerate(shown):
            xs: list[float] = []
            ys: list[float] = []
            for slot, name in enumerate(names):
                y = value(name, target)
                if y is not None:
                    xs.append(slot + (i - (len(shown) - 1) / 2) * width)
                    ys.append(y)
            shown_ys = [min(y, clip) for y in ys] if clip else ys
            ax.bar(xs, shown_ys, width, label=target, color=COLORS.get(target))
            for x, y in zip(xs, ys, strict=True):
                if clip and y > clip:
                    ax.text(x, clip, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
        if clip:
            ax.set_ylim(0, clip * 1.12)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    def cell(name: str, target: str) -> Cell | None:
        found = cells.get(name, {}).get(target)
        return found if found is not None and found.runs > found.failed else None

    def relative(field: Callable[[Cell], float | None]) -> Callable[[str, str], float | None]:
        def value(name: str, target: str) -> float | None:
            ours, ref = cell(name, target), cell(name, REFERENCE)
            if ours is None or ref is None:
                return None
            a, b = field(ours), field(ref)
            return a / b if a is not None and b else None

        return value

    proxies = [t for t in targets if t != "direct"]
    ax = axes[0][0]
    bars(ax, targets, relative(lambda c: c.rate), clip=2.0)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_title("throughput relative to nginx tuned (higher is better)")

    ax = axes[0][1]
    bars(ax, proxies, relative(lambda c: c.cpu_us), clip=6.0)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.5, color="red", linewidth=0.8, linestyle="--", label="target: 1.5x")
    ax.set_title("the proxy's CPU per unit of work relative to nginx tuned (lower is better)")

    ax = axes[1][0]
    bars(ax, targets, lambda n, t: c.p99_ms if (c := cell(n, t)) else None)
    ax.set_yscale("log")
    ax.set_title("p99 latency, ms (SSE: each event's delay), log scale")

    ax = axes[1][1]
    bars(ax, proxies, lambda n, t: c.peak_rss_mib if (c := cell(n, t)) else None)
    ax.set_title("peak RSS during the run, MiB")

    for ax in axes.flat:
        ax.legend(fontsize=8, loc="upper left", ncols=5, framealpha=0.9)
        low, high = ax.get_ylim()
        if ax.get_yscale() == "log":
            ax.set_ylim(low, high * 4)  # room for the legend above the bars
        else:
            ax.set_ylim(low, high * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- all of it ----------------------------------------------------------------------------


def write(results: Results, directory: Path, name: str) -> str:
    """Write NAME.md, NAME.png and NAME.json; returns the Markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    cells = aggregate(results.runs)
    found = checks(results, cells)
    text = markdown(results, cells, found)
    (directory / f"{name}.md").write_text(text)
    chart(results, cells, directory / f"{name}.png")
    raw = {
        "meta": results.meta,
        "targets_checked": [asdict(c) for c in found],
        "medians": {s: {t: asdict(c) for t, c in row.items()} for s, row in cells.items()},
        "memory_mib": results.memory,
        "readiness_s": results.readiness,
        "runs": [run.to_dict() for run in results.runs],
    }
    (directory / f"{name}.json").write_text(json.dumps(raw, indent=1) + "\n")
    return text


README_START = "<!-- latest results: written by `python -m bench`, do not edit -->"
README_END = "<!-- end of latest results -->"


def update_readme(readme: Path, text: str) -> None:
    """Put `text` (the Markdown report, its title demoted one level) between the markers."""
    if not readme.exists():
        return
    content = readme.read_text()
    start, end = content.find(README_START), content.find(README_END)
    if start < 0 or end < start:
        return
    demoted = "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines())
    content = content[: start + len(README_START)] + "\n" + demoted + "\n" + content[end:]
    readme.write_text(content)


def load(path: Path) -> Results:
    """The Results a previous run wrote as JSON, to write its report again."""
    raw = json.loads(path.read_text())
    runs = []
    for run in raw["runs"]:
        measurement = run.pop("measurement")
        foreign = run.pop("foreign_cpu")
        runs.append(
            Run(
                **run,
                measurement=Measurement(**measurement) if measurement else None,
                foreign_cpu={int(cpu): share for cpu, share in foreign.items()}
                if foreign
                else None,
            )
        )
    return Results(
        meta=raw["meta"],
        runs=runs,
        memory=raw["memory_mib"],
        readiness=raw["readiness_s"],
        scenarios=[BY_NAME[name] for name in raw["meta"]["scenarios"]],
    )
