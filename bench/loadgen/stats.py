"""What one load run measured, in the same shape whichever generator produced it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass
class Measurement:
    """`count` units of work (requests, events, MiB or echoes) done in `elapsed` seconds;
    latencies in milliseconds (per request, per event's delay, per transfer, per echo)."""

    count: float
    elapsed: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int = 0
    ttfc_p50_ms: float | None = None  # SSE: request sent -> first event received
    ttfc_p99_ms: float | None = None
    delivered: float | None = None  # SSE: fraction of the events sent that arrived
    batched: float | None = None  # SSE: fraction of events read together with the one before

    @property
    def rate(self) -> float:
        return self.count / self.elapsed if self.elapsed > 0 else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Measurement:
        return cls(**json.loads(text))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(seconds: Sequence[float], q: float) -> float | None:
    value = percentile(seconds, q)
    return None if value is None else value * 1000
