"""Run one of the Python clients (`python -m bench.loadgen`) as its own process, pinned
to the load generator's CPU, and read back its Measurement."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from ..backends import REPO
from ..procs import LOADGEN_CPU, pinned
from .stats import Measurement


def run(kind: str, args: Sequence[str], *, timeout: float) -> Measurement:
    argv = [sys.executable, "-m", "bench.loadgen", kind, *args]
    done = subprocess.run(
        pinned(LOADGEN_CPU, argv), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(
            f"{kind} client failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return Measurement.from_json(done.stdout.strip().splitlines()[-1])


def hold_idle(port: int, path: str, connections: int) -> subprocess.Popen[str]:
    """Start the idle-connections client; it prints one line once they are all open and
    holds them until its stdin is closed."""
    argv = [
        sys.executable, "-m", "bench.loadgen", "idle",
        "--port", str(port), "--path", path, "--concurrency", str(connections),
    ]  # fmt: skip
    return subprocess.Popen(
        pinned(LOADGEN_CPU, argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
