"""The fault matrix: each fault injected into a real child process behind the real CLI (or
the real lifecycle in process), and what the proxy must do about it.

Each module says what it injects and what must follow:

- test_crash: the child dies mid-stream (the client sees a cut stream, not a hang) or as
  a request arrives (502 upstream_unavailable); either way it is restarted and counted;
- test_hang: a request the child never answers (504 after request_timeout_seconds);
  readiness probes that hang (/ready 503 and not_ready after the stop-traffic threshold);
- test_startup: a child slow to start gets traffic once ready, with no restart; one never
  ready: tests/test_lifecycle.py*;
- test_crash_loop: the backoff doubles to its cap and the proxy gives up after 5 exits
  never ready (readiness breaking the streak: tests/test_lifecycle.py*);
- liveness failing past restart_threshold_seconds kills the whole group and restarts it:
  tests/test_lifecycle.py*, test_failing_liveness_kills_the_whole_group_and_restarts;
- a child ignoring SIGTERM is killed after child_stop_grace_seconds and the proxy exits 0:
  tests/test_shutdown.py*, test_a_child_ignoring_sigterm_is_killed_after_the_grace;
- test_grandchildren: `sh -c "a & b"` leaves no orphan and no zombie after a restart or a
  shutdown;
- test_disconnect: a client leaving mid-request or mid-stream cancels the child's request,
  frees its slot, and is counted 499;
- test_sigterm_load: SIGTERM under load answers every request accepted before the listener
  closed, and every open stream ends whole.

(* the existing tests that prove it; the modules here name them.)
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import aiohttp

from ..conftest import free_port, write_config
from ..test_metrics import scrape

CHILD = Path(__file__).resolve().with_name("child.py")
SAFETY = 10  # seconds; a safety net only
STARTED = r"started the model server \(pid (\d+)\)"
READY = r"the model server is ready after"


def fault_config(tmp_path: Path, control: Path, **settings: Any) -> Path:
    """A config running tests/faults/child.py as the model server (the shell exec's it, so
    the proxy's child pid is the server's), probed on /ready and /live."""
    port = free_port()
    words = [sys.executable, str(CHILD), "--port", str(port), "--dir", str(control)]
    return write_config(
        tmp_path,
        server_port=port,
        start_command="exec " + shlex.join(words),
        readiness_endpoint="/ready",
        liveness_endpoint="/live",
        **settings,
    )


async def samples(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with asyncio.timeout(SAFETY):
        return await scrape(session, url)


def pid_in(line: str) -> int:
    match = re.search(STARTED, line)
    assert match is not None, line
    return int(match[1])
