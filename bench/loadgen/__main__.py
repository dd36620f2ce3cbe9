"""`python -m bench.loadgen KIND ...`: run one Python client and print its Measurement as
JSON on the last line (the orchestrator pins this process to the load generator's CPU)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvloop

from . import idle, sse, ws

HOST = "127.0.0.1"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind in ("sse", "ws", "idle"):
        sub = kinds.add_parser(kind)
        sub.add_argument("--port", type=int, required=True)
        sub.add_argument("--path", required=True)
        sub.add_argument("--concurrency", type=int, default=1)
        sub.add_argument("--duration", type=float, default=5.0)
    kinds.choices["sse"].add_argument("--events", type=int, required=True)
    kinds.choices["sse"].add_argument(
        "--once", action="store_true", help="one stream per connection, all started together"
    )
    kinds.choices["sse"].add_argument(
        "--stagger", type=float, default=0.0, help="seconds between the connections' starts"
    )
    kinds.choices["ws"].add_argument("--size", type=int, default=64)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    common = {"concurrency": args.concurrency, "duration": args.duration}
    if args.kind == "idle":
        return uvloop.run(idle.hold(HOST, args.port, args.path, connections=args.concurrency))
    if args.kind == "sse":
        result = uvloop.run(
            sse.run(
                HOST,
                args.port,
                args.path,
                events=args.events,
                once=args.once,
                stagger=args.stagger,
                **common,
            )
        )
    else:
        result = uvloop.run(ws.run(HOST, args.port, args.path, size=args.size, **common))
    print(result.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
