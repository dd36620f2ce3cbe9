"""`python -m bench`: start the backends and every target, run the scenarios interleaved
(A B C D A B C D ...), and write the report to bench/results/."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import backends as backend_servers
from . import install, report
from .figures import Results
from .measure import Run, memory_at_rest, readiness_latency, run_once
from .procs import LOADGEN_CPU, SERVER_CPU
from .scenarios import BY_NAME, SCENARIOS, Scenario
from .targets import TARGET_NAMES, Target, launch_model_proxies, start_all

BENCH = Path(__file__).resolve().parent
MAX_RUN_SECONDS = 60.0
KEEP_RUNS = 5  # run directories kept under bench/work/


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="model-proxy side by side with nginx."
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke check: 1 repetition of 2 s, fewer scenarios"
    )
    parser.add_argument("--reps", type=int, help="repetitions of each run (default 3; quick: 1)")
    parser.add_argument("--duration", type=float, help="seconds per run (default 5; quick: 2)")
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated subset of: {', '.join(BY_NAME)} (default: all; quick: its set)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGET_NAMES),
        help=f"comma-separated subset of: {', '.join(TARGET_NAMES)}",
    )
    parser.add_argument(
        "--output",
        help="results name under bench/results/ (default: latest; quick: quick)",
    )
    parser.add_argument(
        "--backend-cpu",
        type=int,
        choices=(LOADGEN_CPU, SERVER_CPU),
        default=SERVER_CPU,
        help=f"the CPU of the Python backend (default {SERVER_CPU}: beside the target, as in a "
        f"pod; {LOADGEN_CPU}: beside the load generator, to see what sharing a CPU with the "
        "backend costs the target)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="do not install missing tools, fail instead"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="measure nothing: write the report of a previous run's JSON again",
    )
    return parser


def _pick_scenarios(spec: str | None, quick: bool) -> list[Scenario]:
    if spec is None:
        return [s for s in SCENARIOS if s.quick or not quick]
    unknown = [name for name in spec.split(",") if name not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [BY_NAME[name] for name in spec.split(",")]


def _pick_targets(spec: str) -> list[str]:
    names = spec.split(",")
    unknown = [name for name in names if name not in TARGET_NAMES]
    if unknown:
        raise SystemExit(
            f"unknown target(s): {', '.join(unknown)}; known: {', '.join(TARGET_NAMES)}"
        )
    return [name for name in TARGET_NAMES if name in names]  # always in the same order


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _describe(run: Run, unit: str) -> str:
    m = run.measurement
    if m is None:
        return f"FAILED {run.error}"
    cpu = ""
    if run.proxy_cpu_s and m.count:
        cpu = f", {run.proxy_cpu_s * 1e6 / m.count:.0f} µs CPU/{unit}"
    return f"{m.rate:,.0f} {unit}/s, p50 {m.p50_ms or 0:.2f} ms, p99 {m.p99_ms or 0:.2f} ms{cpu}"


def _run_scenarios(
    scenarios: Sequence[Scenario],
    targets: Sequence[Target],
    servers: backend_servers.Backends,
    *,
    reps: int,
    duration: float,
    workdir: Path,
) -> list[Run]:
    runs: list[Run] = []
    warmup = min(1.0, duration / 2)
    for scenario in scenarios:
        _log(f"== {scenario.name}: {scenario.title}")
        for target in targets:
            try:
                scenario.check(target)
            except Exception as exc:  # reported; its runs still show what happened
                _log(f"   {target.name}: the check call failed: {exc}")
        if scenario.warms_up:
            for target in targets:
                run_once(scenario, target, servers, rep=-1, duration=warmup, workdir=workdir)
        for rep in range(reps):
            # interleaved, every other repetition in reverse (A B C D D C B A ...): a target
            # is not always the one that runs first after a warm-up or another's run
            for target in targets if rep % 2 == 0 else targets[::-1]:
                run = run_once(
                    scenario, target, servers, rep=rep, duration=duration, workdir=workdir
                )
                runs.append(run)
                _log(f"   {rep + 1}/{reps} {target.name:13} {_describe(run, scenario.unit)}")
    return runs


def _prune(runs: Path, keep: int = KEEP_RUNS) -> None:
    """Remove all but the newest `keep` run directories (their logs and configs)."""
    dated = sorted(p for p in runs.iterdir() if p.is_dir() and p.name[:8].isdigit())
    for old in dated[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that every backend and target started is stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.from_json:
        results = report.load(args.from_json)
        output = args.output or args.from_json.stem
        table = report.write(results, BENCH / "results", output)
        if output == "latest":
            report.update_readme(BENCH / "README.md", table)
        print(table)
        return 0
    reps = args.reps or (1 if args.quick else 3)
    duration = args.duration or (2.0 if args.quick else 5.0)
    if duration > MAX_RUN_SECONDS:
        raise SystemExit(f"--duration: at most {MAX_RUN_SECONDS:g} s per run")
    scenarios = _pick_scenarios(args.scenarios, args.quick)
    target_names = _pick_targets(args.targets)
    output = args.output or ("quick" if args.quick else "latest")
    if not args.no_install:
        install.ensure_all()
    # the orchestrator waits on the load generators: it stays on their CPU
    os.sched_setaffinity(0, {LOADGEN_CPU})
    if os.cpu_count() != 2:
        _log(f"warning: the bench is laid out for 2 CPUs; this machine has {os.cpu_count()}")

    started = time.monotonic()
    workdir = BENCH / "work" / time.strftime("%Y%m%d-%H%M%S")
    workdir.mkdir(parents=True)
    _prune(workdir.parent)
    memory: dict[str, dict[str, float]] = {}
    readiness: list[float] = []
    with ExitStack() as cleanup:
        ports = backend_servers.pick_ports()
        early = launch_model_proxies(workdir, ports, target_names, cleanup)
        servers = backend_servers.start(workdir, ports, python_cpu=args.backend_cpu)
        cleanup.callback(servers.stop)
        targets = start_all(workdir, servers, target_names, cleanup, model_proxies=early)
        _log(f"started the backends and {', '.join(target_names)} (logs in {workdir})")
        for target in targets:
            if target.name != "direct":
                try:
                    memory[target.name] = memory_at_rest(target)
                except Exception as exc:  # reported; the scenarios still run
                    _log(f"memory at rest of {target.name} not measured: {exc}")
        if "model-proxy" in target_names:
            try:
                readiness = [readiness_latency(workdir) for _ in range(reps)]
                _log(f"child ready -> /ready 200: {statistics.median(readiness) * 1000:.1f} ms")
            except Exception as exc:
                _log(f"readiness latency not measured: {exc}")
        runs = _run_scenarios(
            scenarios, targets, servers, reps=reps, duration=duration, workdir=workdir
        )

    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": args.quick,
        "reps": reps,
        "duration_s": duration,
        "runtime_s": round(time.monotonic() - started, 1),
        "backend_cpu": args.backend_cpu,
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "python": platform.python_version(),
        "targets": target_names,
        "scenarios": [s.name for s in scenarios],
        "workdir": str(workdir),
    }
    results = Results(meta, runs, memory, readiness, scenarios)
    table = report.write(results, BENCH / "results", output)
    if output == "latest":
        report.update_readme(BENCH / "README.md", table)
    print(table)
    _log(f"wrote bench/results/{output}.md, .png and .json in {meta['runtime_s']:.0f} s")
    return 0
