"""`python -m bench.profile` (or `bash bench/profile.sh`): the small-POST scenario against
model-proxy under py-spy, to see where the proxy's time goes.

Two recordings of the same load: a flamegraph SVG, and the collapsed stacks (`--format
raw`: speedscope.app opens that file as it is) from which the top functions by own and by
inclusive time are written as text."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from . import backends as backend_servers
from . import install
from .loadgen import wrk
from .loadgen.stats import Measurement
from .procs import LOADGEN_CPU, pinned
from .targets import launch_model_proxies

BENCH = Path(__file__).resolve().parent
TOP = 30


def _record(
    py_spy: Path, pid: int, output: Path, fmt: str, *, seconds: int, rate: int, native: bool
) -> subprocess.Popen[bytes]:
    argv = [
        str(py_spy), "record", "--pid", str(pid), "--duration", str(seconds),
        "--rate", str(rate), "--format", fmt, "--output", str(output),
        *(["--native"] if native else []),
        # the stacks for the summary by function; the flamegraph keeps line numbers
        *(["--function"] if fmt == "raw" else []),
    ]  # fmt: skip
    return subprocess.Popen(pinned(LOADGEN_CPU, argv), stdout=subprocess.DEVNULL)


def top_functions(collapsed: str, limit: int = TOP) -> str:
    """The functions that hold the most samples of the event loop's thread, by own time (the
    innermost frame) and by inclusive time (anywhere on the stack), from py-spy's collapsed
    stacks. Other threads (the log writer, mostly blocked on its queue, which py-spy does
    not always see as idle) are only counted."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = others = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if "(threading.py:" in frames[0]:  # a thread other than the main one
            others += count
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"
    lines = [
        f"{total} samples of the event loop's thread ({others} more in other threads).",
        "Own time in Runner.run (or uvloop's run_forever) is time inside uvloop's C code:",
        "I/O, system calls, the loop itself; --native breaks it down.",
        "",
        f"top {limit} by own time:",
    ]
    lines += [f"{n / total:7.1%}  {frame}" for frame, n in own.most_common(limit)]
    lines += ["", f"top {limit} by inclusive time:"]
    lines += [f"{n / total:7.1%}  {frame}" for frame, n in inclusive.most_common(limit)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="length of each recording")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--backend", choices=("static", "python"), default="static")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument(
        "--native", action="store_true", help="include C frames (uvloop, httptools, the kernel)"
    )
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "profile")
    args = parser.parse_args(argv)

    install.ensure_debian_tools()
    py_spy = install.py_spy()
    os.sched_setaffinity(0, {LOADGEN_CPU})
    args.output.mkdir(parents=True, exist_ok=True)
    workdir = BENCH / "work" / "profile"
    workdir.mkdir(parents=True, exist_ok=True)
    svg, raw = args.output / "flamegraph.svg", args.output / "stacks.txt"
    with ExitStack() as cleanup:
        ports = backend_servers.pick_ports()
        # before its backends: see targets.ModelProxy
        proxy = launch_model_proxies(workdir, ports, ["model-proxy"], cleanup)["model-proxy"]
        servers = backend_servers.start(workdir, ports)
        cleanup.callback(servers.stop)
        proxy.wait()
        pid, port = proxy.pids(args.backend)[0], proxy.port(args.backend)
        path = proxy.path("/predict")

        def load(seconds: float) -> Measurement:
            return wrk.run(
                "post", port, path, concurrency=args.concurrency, duration=seconds, workdir=workdir
            )

        load(1)  # warm up
        for output, fmt in ((svg, "flamegraph"), (raw, "raw")):
            recorder = _record(
                py_spy, pid, output, fmt, seconds=args.seconds, rate=args.rate, native=args.native
            )
            result = load(args.seconds + 1)  # covers the recording
            if recorder.wait(30) != 0:
                raise SystemExit(f"py-spy failed ({recorder.returncode}); is ptrace allowed?")
            print(f"{fmt}: {result.rate:,.0f} req/s under the profiler -> {output}")
    summary = top_functions(raw.read_text())
    (args.output / "top.txt").write_text(summary)
    print(summary)
    print(f"wrote {svg}, {raw} (open it in speedscope.app) and {args.output / 'top.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
