"""Reading a response as it passes: Server-Sent Events counted and timed, and the token
counts of an OpenAI-style `usage` object, with no copy of the stream and no delay."""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable
from time import monotonic
from typing import Protocol

Headers = list[tuple[bytes, bytes]]

SSE, JSON = "sse", "json"
# a JSON body's `usage` is near its end: its last bytes are kept (as references to its
# chunks) and read once it has ended
JSON_WINDOW = 65536
# an event split over several reads is kept whole (as references) up to this size, to read
# its `usage`; a larger one is still counted and timed
EVENT_MAX = 65536
_TAIL = 4  # bytes of an unfinished event kept to see a separator or "data:" cut in two
_DATA = b"data:"
_USAGE = b'"usage"'
_USAGE_TRIES = 4  # a nested "usage" key may come after the top-level one
_PROMPT_KEYS = ("prompt_tokens", "input_tokens")  # Chat Completions; Responses API
_COMPLETION_KEYS = ("completion_tokens", "output_tokens")


class Histogram(Protocol):
    """Where event times go (metrics.Histogram): the gaps are counted into it inline, as
    that runs for every event of every stream."""

    buckets: tuple[float, ...]  # upper bounds, sorted
    counts: list[int]  # one per bucket, and +Inf last
    total: float

    def observe(self, value: float) -> None: ...


def response_kind(headers: Headers) -> str | None:
    """SSE for `text/event-stream`, JSON for `application/json`, else None (not scanned)."""
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"content-type":
            media = value.partition(b";")[0].strip().lower()
            if media == b"text/event-stream":
                return SSE
            if media == b"application/json":
                return JSON
            return None
    return None


class ResponseScanner:
    """Fed each chunk of one response body as it is passed on.

    An event stream: each completed event with a `data:` field is counted and timed at the
    chunk that completes it (the first against `arrived_at`, the next ones against the
    event before). Events are found by a bytes search for the blank line that ends them;
    of an unfinished event only its last few bytes are carried to the next chunk, and
    references to its pieces while it may hold `usage`. The last event that says "usage"
    is kept (a reference: each read of a token stream is one whole event).

    A JSON body: references to its last chunks. `usage()` parses the `usage` object once,
    when the response has ended.
    """

    __slots__ = (
        "_clock",
        "_data",
        "_fast",
        "_first",
        "_gaps",
        "_last_event_at",
        "_open",
        "_open_bytes",
        "_recent",
        "_recent_bytes",
        "_sep",
        "_sse",
        "_tail",
        "_usage",
        "events",
        "first_event_at",
    )

    def __init__(
        self,
        *,
        sse: bool,
        arrived_at: float,
        first: Histogram,
        gaps: Histogram,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._sse = sse
        self._first = first  # the time to the first event
        self._gaps = gaps  # the time between events
        self._clock = clock
        # the separator, while the stream is at an event's start and its separator known:
        # then a read that is one whole event takes the short way
        self._fast: bytes | None = None
        self._recent: list[bytes] = []  # JSON: the body's last chunks
        self._recent_bytes = 0
        self._sep: bytes | None = None  # b"\n\n" or b"\r\n\r\n", from the first line's end
        self._tail = b""  # the last bytes of an unfinished event (b"": none is open)
        self._data = False  # the unfinished event has a data field
        # the unfinished event's pieces (chunk, offset); None: too large to read usage in
        self._open: list[tuple[bytes, int]] | None = []
        self._open_bytes = 0
        self._usage = b""  # the last event that says "usage"
        self._last_event_at = arrived_at  # so that the first "gap" is the time to it
        self.events = 0  # data events seen
        self.first_event_at: float | None = None

    def feed(self, chunk: bytes) -> None:
        # the usual token stream: each read is one whole event (its one separator ends it).
        # This runs for every event: written for the fewest steps and objects touched
        sep = self._fast
        if sep is not None and chunk.find(sep) == len(chunk) - len(sep) >= 0:
            if _USAGE in chunk:
                self._usage = chunk
            if chunk.startswith(_DATA) or _DATA in chunk:
                now = self._clock()
                gap = now - self._last_event_at
                self._last_event_at = now
                self.events += 1
                if self.first_event_at is None:
                    self.first_event_at = now
                    self._first.observe(gap)
                else:
                    gaps = self._gaps
                    gaps.counts[bisect_left(gaps.buckets, gap)] += 1
                    gaps.total += gap
        elif not self._sse:
            self._keep(chunk)
        elif chunk:
            self._scan(chunk)
            self._fast = None if self._tail else self._sep

    def usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens of the response's last `usage` object, if any."""
        text = self._usage if self._sse else b"".join(self._recent)[-JSON_WINDOW:]
        at = len(text)
        for _ in range(_USAGE_TRIES):
            at = text.rfind(_USAGE, 0, at)
            if at == -1:
                return None
            found = _usage_at(text, at + len(_USAGE))
            if found is not None:
                return found
        return None

    def _keep(self, chunk: bytes) -> None:
        """A JSON body's chunk: the last JSON_WINDOW bytes are kept, trimmed now and then."""
        if not chunk:
            return
        recent = self._recent
        recent.append(chunk)
        self._recent_bytes += len(chunk)
        if self._recent_bytes > 2 * JSON_WINDOW:
            kept = 0
            for index in range(len(recent) - 1, -1, -1):
                kept += len(recent[index])
                if kept >= JSON_WINDOW:
                    del recent[:index]
                    break
            self._recent_bytes = kept

    # -- Server-Sent Events -----------------------------------------------------------

    def _scan(self, chunk: bytes) -> None:
        sep = self._sep
        if sep is None:
            sep = self._sep = self._separator(chunk)
            if sep is None:  # no line has ended yet: all of it is the first event's
                tail = self._tail
                if not self._data:
                    self._data = _DATA in chunk or _DATA in tail + chunk[:_TAIL]
                self._tail = (tail + chunk[-_TAIL:])[-_TAIL:]
                self._hold(chunk, 0)
                return
        size = len(sep)
        completed = 0
        start = 0  # where the unfinished event begins in `chunk`
        found = False  # an event ended in this chunk
        tail = self._tail
        if tail:  # an event was open: a separator or "data:" may be cut by the chunk edge
            joint = tail + chunk[:_TAIL]
            if not self._data:
                at = joint.find(_DATA)
                self._data = 0 <= at < len(tail)
            at = joint.find(sep)
            if 0 <= at < len(tail):
                completed += self._data
                self._close(chunk, 0, 0)
                start = at + size - len(tail)
                found = True
        while (end := chunk.find(sep, start)) != -1:
            if self._data or chunk.find(_DATA, start, end) != -1:
                completed += 1
            self._close(chunk, start, end)
            start = end + size
            found = True
        if start < len(chunk):
            if not self._data:
                self._data = chunk.find(_DATA, start) != -1
            # never a copy of more than the few bytes kept
            kept = chunk[max(start, len(chunk) - _TAIL) :]
            self._tail = kept if found else (tail + kept)[-_TAIL:]
            self._hold(chunk, start)
        else:
            self._tail = b""
        if completed:
            self._events(completed)

    def _separator(self, chunk: bytes) -> bytes | None:
        """How this stream ends its lines, from the first line end it shows."""
        at = chunk.find(b"\n")
        if at == -1:
            return None
        crlf = chunk[at - 1] == 13 if at else self._tail.endswith(b"\r")
        return b"\r\n\r\n" if crlf else b"\n\n"

    def _hold(self, chunk: bytes, start: int) -> None:
        """The unfinished event goes on in `chunk` from `start`."""
        if self._open is None:
            return
        self._open.append((chunk, start))
        self._open_bytes += len(chunk) - start
        if self._open_bytes > EVENT_MAX:
            self._open = None  # its usage will not be read: it is no usage chunk

    def _close(self, chunk: bytes, start: int, end: int) -> None:
        """The event that began in the pieces held (if any) ends at `end` of `chunk`; its
        "usage", if it says it, is kept."""
        pieces = self._open
        if not pieces:
            if pieces is not None and chunk.find(_USAGE, start, end) != -1:
                self._usage = chunk[start:end]
        else:
            event = b"".join(piece[offset:] for piece, offset in pieces) + chunk[start:end]
            if _USAGE in event:
                self._usage = event
        self._open = []
        self._open_bytes = 0
        self._data = False

    def _events(self, count: int) -> None:
        """`count` data events completed in the chunk that arrived now."""
        now = self._clock()
        self.events += count
        if self.first_event_at is None:
            self.first_event_at = now
            self._first.observe(now - self._last_event_at)
        else:
            self._gaps.observe(now - self._last_event_at)
        for _ in range(count - 1):
            self._gaps.observe(0.0)  # arrived in the same read as the one before
        self._last_event_at = now


def _usage_at(text: bytes, at: int) -> tuple[int, int] | None:
    """The token counts of the JSON object after `"usage"` at `at` (`: {...}`), if any."""
    rest = text[at:].lstrip()
    if not rest.startswith(b":"):
        return None
    rest = rest[1:].lstrip()
    if not rest.startswith(b"{"):
        return None  # "usage": null, as every chunk of an include_usage stream but the last
    try:
        usage, _ = _DECODER.raw_decode(rest.decode("utf-8", "replace"))
    except ValueError:
        return None  # cut by the window's start or end, or not JSON after all
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage, _PROMPT_KEYS)
    completion = _count(usage, _COMPLETION_KEYS)
    if prompt is None and completion is None:
        return None
    return prompt or 0, completion or 0


def _count(usage: dict[str, object], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


_DECODER = json.JSONDecoder()
