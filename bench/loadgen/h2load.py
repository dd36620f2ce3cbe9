"""h2load (nghttp2) for gRPC load: each request is a gRPC call whose body, one prebuilt
length-prefixed message, comes from a file; per-call times come from its --log-file, for
the percentiles its own summary lacks. h2load reads HTTP statuses only: gRPC statuses ride
in trailers, so the bench's backend never fails a call (checked once per target before the
runs, with grpcio, in `check_call`)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import grpc

from ..procs import LOADGEN_CPU, pinned
from .stats import Measurement, percentile

WARM_UP = 1.0  # seconds of calls before a timed run is measured
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s)")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


def run(
    port: int,
    path: str,
    body: Path,
    *,
    connections: int,
    streams: int = 1,
    duration: float | None = None,
    calls: int | None = None,
    messages_per_call: int = 1,
    workdir: Path,
) -> Measurement:
    """`connections` clients with up to `streams` calls in flight each, for `duration`
    seconds (after a 1 s warm-up) or until `calls` calls are done. Counts messages
    (`messages_per_call` per call); latency is per call."""
    log = workdir / f"h2load-{port}-{path.strip('/').replace('/', '_')}.log"
    log.unlink(missing_ok=True)
    argv = [
        "h2load", "-t1", f"-c{connections}", f"-m{streams}", "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        f"--log-file={log}",
    ]  # fmt: skip
    warm_up = 0.0
    if calls is not None:
        argv.append(f"-n{calls}")
    else:
        assert duration is not None
        warm_up = WARM_UP
        argv += [f"-D{duration:g}", f"--warm-up-time={warm_up:g}"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    timeout = (duration or 0) + 120
    done = subprocess.run(
        pinned(LOADGEN_CPU, argv), capture_output=True, text=True, timeout=timeout
    )
    finished, requests = _FINISHED.search(done.stdout), _REQUESTS.search(done.stdout)
    if done.returncode != 0 or finished is None or requests is None:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stdout[-500:]} {done.stderr}")
    # "finished in" counts the warm-up too; the requests counted are the timed ones
    elapsed = duration if duration else float(finished[1]) / (1000 if finished[2] == "ms" else 1)
    succeeded = int(requests[4])
    # with a duration, the calls still running when it ends count as failed: not errors
    failed = int(requests[6]) + int(requests[7]) + (int(requests[5]) if calls else 0)
    latencies = _latencies(log, warm_up)
    return Measurement(
        count=succeeded * messages_per_call,
        elapsed=elapsed,
        p50_ms=_ms(latencies, 50),
        p99_ms=_ms(latencies, 99),
        errors=failed + sum(1 for status, _ in latencies if status != 200),
    )


def _latencies(log: Path, warm_up: float) -> list[tuple[int, float]]:
    """(HTTP status, seconds) per call, from h2load's log: start time in µs since the
    epoch, status, µs to the end of the response, tab-separated. It also logs the warm-up's
    calls, and with status 0 the calls a phase's end cut: both are left out."""
    entries = []
    for line in log.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1] != "0":
            entries.append((int(fields[0]), int(fields[1]), int(fields[2]) / 1e6))
    if not entries:
        return []
    measured_from = min(start for start, _, _ in entries) + warm_up * 1e6
    return [(status, seconds) for start, status, seconds in entries if start >= measured_from]


def _ms(latencies: list[tuple[int, float]], q: float) -> float | None:
    value = percentile([seconds for _, seconds in latencies], q)
    return None if value is None else value * 1000


def check_call(port: int, path: str, message: bytes) -> int:
    """One call with grpcio through whatever listens on `port`: how many messages came
    back with status OK (an error raises)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(path)
        return sum(1 for _ in call(message, timeout=30))
