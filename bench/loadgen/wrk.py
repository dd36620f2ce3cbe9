"""wrk for request/response load: small POSTs, 10 MiB uploads and downloads. A Lua script
sets the request and its done() prints the figures as JSON. (wrk is C: a Python client
reading 10 MiB bodies tops out near 500 MiB/s here, below what the proxies manage.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ..procs import LOADGEN_CPU, pinned
from .stats import Measurement

SMALL_BODY = '{"inputs": [1, 2, 3]}'
MIB = 1024 * 1024

# wrk's latency figures are in microseconds; errors.status counts non-2xx/3xx answers
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "bytes": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "errors": %d}\\n',
    summary.requests, summary.bytes, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""
_SMALL_POST = f"""
wrk.method = "POST"
wrk.body = '{SMALL_BODY}'
wrk.headers["Content-Type"] = "application/json"
"""
_UPLOAD = """
wrk.method = "POST"
wrk.body = string.rep("x", {size})
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def _script(workdir: Path, name: str, text: str) -> Path:
    path = workdir / f"{name}.lua"
    if not path.exists():
        path.write_text(text + _DONE)
    return path


def _wrk(port: int, path: str, script: Path, concurrency: int, duration: float) -> dict[str, int]:
    argv = [
        "wrk", "-t1", f"-c{concurrency}", f"-d{duration:g}s", "--timeout", "10s",
        "-s", str(script), f"http://127.0.0.1:{port}{path}",
    ]  # fmt: skip
    done = subprocess.run(
        pinned(LOADGEN_CPU, argv), capture_output=True, text=True, timeout=duration + 30
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    figures: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def run(
    kind: str,
    port: int,
    path: str,
    *,
    concurrency: int,
    duration: float,
    workdir: Path,
    upload_size: int = 0,
) -> Measurement:
    """`kind` "post" counts requests (a small JSON POST each), "upload" MiB sent in
    `upload_size` request bodies, "download" MiB received (headers included: a few hundred
    bytes per 10 MiB)."""
    if kind == "post":
        script = _script(workdir, "small-post", _SMALL_POST)
    elif kind == "upload":
        script = _script(workdir, f"upload-{upload_size}", _UPLOAD.format(size=upload_size))
    elif kind == "download":
        script = _script(workdir, "download", "")
    else:
        raise ValueError(f"wrk cannot run {kind!r}")
    figures = _wrk(port, path, script, concurrency, duration)
    counts = {
        "post": figures["requests"],
        "upload": figures["requests"] * upload_size / MIB,
        "download": figures["bytes"] / MIB,
    }
    return Measurement(
        count=counts[kind],
        elapsed=figures["duration_us"] / 1e6,
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        errors=figures["errors"],
    )
