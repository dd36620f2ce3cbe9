"""model-proxy whose response scanning (Server-Sent Events timing, token counting) SIGUSR1
turns off and SIGUSR2 on again, for `python -m bench.scan_cost` to compare the two in one
process: same heap, same sockets, same place on the machine. Not a setting of the proxy,
which always scans.

    python -m bench.scan_switch run --config PATH
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

from proxy import app, cli


class Switch:
    """Whether the proxy scans responses; flipped by SIGUSR1 (off) and SIGUSR2 (on)."""

    def __init__(self) -> None:
        self.on = True

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.on = signum == signal.SIGUSR2
        # the bench waits for this line before it measures
        print(f"scanning {'on' if self.on else 'off'}", file=sys.stderr, flush=True)


def install() -> None:
    switch = Switch()
    scan = app.Proxy._scanner

    def scanner(self: app.Proxy, exchange: Any, headers: Any) -> Any:
        return scan(self, exchange, headers) if switch.on else None

    app.Proxy._scanner = scanner  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR1, switch)
    signal.signal(signal.SIGUSR2, switch)


if __name__ == "__main__":
    install()
    raise SystemExit(cli.main())
