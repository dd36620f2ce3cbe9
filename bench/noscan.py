"""model-proxy with its response scanning turned off (no SSE event timing, no token
counting), as the bench's `model-proxy-noscan` target: run beside `model-proxy`, it shows what
scanning costs. Not a setting of the proxy, which always scans.

    python -m bench.noscan run --config PATH
"""

from __future__ import annotations

from typing import Any

from proxy import app, cli


def _no_scanner(self: app.Proxy, exchange: Any, headers: Any) -> None:
    return None


if __name__ == "__main__":
    app.Proxy._scanner = _no_scanner  # type: ignore[method-assign]
    raise SystemExit(cli.main())
