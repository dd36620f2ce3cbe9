"""The report of a run: the Markdown table (the issue's targets, every figure, memory and
readiness), the chart and a JSON of every raw figure, in bench/results/."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .chart import chart
from .checks import Check, checks, grpc_checks
from .figures import Cell, Results, aggregate
from .loadgen.stats import Measurement
from .measure import Run
from .scenarios import BY_NAME, Scenario
from .targets import PROXY_NAMES, REFERENCE

LOADGEN_BOUND = 0.85  # the load generator used this much of its CPU: it may be the limit
# Other work on the machine makes a row noisy when it takes this much of CPU 1 (the
# target's and the backend's), or when with the load generator it fills CPU 0.
NOISY_CPU1 = 0.15
NOISY_CPU0 = 0.9


def _noisy(cell: Cell) -> bool:
    cpu0 = (cell.foreign_cpu0 or 0.0) + (cell.loadgen_busy or 0.0)
    return (cell.foreign_cpu1 or 0.0) > NOISY_CPU1 or cpu0 > NOISY_CPU0


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
    if _noisy(cell):
        others = f"CPU 0 {cell.foreign_cpu0 or 0:.0%}, CPU 1 {cell.foreign_cpu1 or 0:.0%}"
        notes.append(f"*noisy* (others took {others})")
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


def _layout(meta: dict[str, Any]) -> str:
    if meta.get("backend_cpu", 1) == 0:  # --backend-cpu 0
        return "Load generator and Python backend on CPU 0, target (and static backend) on CPU 1."
    return "Load generator on CPU 0, target and backend on CPU 1."


def markdown(
    results: Results,
    cells: dict[str, dict[str, Cell]],
    found: dict[str, list[Check]],
    grpc_found: dict[str, list[Check]] | None = None,
) -> str:
    """`found` and `grpc_found`: the targets checked, for each model-proxy build measured."""
    meta = results.meta
    lines = [
        f"# model-proxy side by side with nginx — {meta['date']}",
        "",
        f"{meta['reps']} repetition(s) of {meta['duration_s']:g} s per run, interleaved; "
        f"medians. {meta['machine']}, Python {meta['python']}. {_layout(meta)} "
        f"Whole run: {meta['runtime_s']:.0f} s" + (" (`--quick`)." if meta["quick"] else "."),
    ]
    noise = {
        cpu: [r.foreign_cpu.get(cpu, 0.0) for r in results.runs if r.foreign_cpu] for cpu in (0, 1)
    }
    if noise[0] and noise[1]:
        shares = " and ".join(
            f"{statistics.median(noise[cpu]):.0%} of CPU {cpu} ({max(noise[cpu]):.0%} at worst)"
            for cpu in (0, 1)
        )
        lines += [
            "",
            f"Other work on the machine took {shares} during the median run. Rows where it "
            f"took more than {NOISY_CPU1:.0%} of CPU 1, or left the load generator less than "
            f"{1 - NOISY_CPU0:.0%} of CPU 0 to spare, are marked *noisy*: compare them with care.",
        ]
    mark = {True: "yes", False: "**no**", None: "-"}
    for build, build_found in found.items():
        lines += ["", f"## Issues 5 and 13 targets ({build})", "",
                  "| target | measured | met |", "| --- | --- | --- |"]  # fmt: skip
        lines += [f"| {c.target} | {c.measured} | {mark[c.met]} |" for c in build_found]
    for build, build_found in (grpc_found or {}).items():
        if not any(c.measured != "not measured" for c in build_found):
            continue
        lines += ["", f"## Issue 10 targets ({build}, gRPC)", "",
                  "| target | measured | met |", "| --- | --- | --- |"]  # fmt: skip
        lines += [f"| {c.target} | {c.measured} | {mark[c.met]} |" for c in build_found]
    lines += [
        "",
        "## Every figure",
        "",
        "rate: units of work per second; vs nginx: ratio to nginx tuned; p50/p99: latency of a "
        "request, a 10 MiB transfer, a WebSocket echo or a whole gRPC call, and for SSE each "
        "event's delay from the backend writing it to the client reading it; TTFC: request "
        "sent → first event (added over direct in brackets); CPU: the target's processes' CPU "
        "time (user + system, "
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


def write(results: Results, directory: Path, name: str) -> str:
    """Write NAME.md, NAME.png and NAME.json; returns the Markdown."""
    directory.mkdir(parents=True, exist_ok=True)
    cells = aggregate(results.runs)
    builds = [name for name in PROXY_NAMES if any(name in row for row in cells.values())]
    found = {build: checks(results, cells, build) for build in builds}
    grpc_found = {build: grpc_checks(cells, build) for build in builds}
    text = markdown(results, cells, found, grpc_found)
    (directory / f"{name}.md").write_text(text)
    chart(results, cells, directory / f"{name}.png")
    raw = {
        "meta": results.meta,
        "targets_checked": {
            build: [asdict(c) for c in found[build] + grpc_found[build]] for build in builds
        },
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
