"""Reading a response as it passes: Server-Sent Events counted and timed, and the token
counts of an OpenAI-style `usage` object, with no copy of the stream and no delay."""

from __future__ import annotations

import json
from collections.abc import Callable
from time import monotonic

Headers = list[tuple[bytes, bytes]]
Observe = Callable[[float], None]

SSE, JSON = "sse", "json"
# how much of a response's end is kept (as references to its chunks) to find `usage` in:
# a stream's usage chunk is its last event but `[DONE]`; a JSON body puts it near its end
SSE_WINDOW = 2048
JSON_WINDOW = 65536
_TAIL = 4  # bytes of an unfinished event kept to see a separator or "data:" cut in two
_DATA = b"data:"
_USAGE = b'"usage"'
_USAGE_TRIES = 4  # a nested "usage" key may come after the top-level one
_PROMPT_KEYS = ("prompt_tokens", "input_tokens")  # Chat Completions; Responses API
_COMPLETION_KEYS = ("completion_tokens", "output_tokens")


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
    """Fed each chunk of one response body as it is passed on. For an event stream, each
    completed event with a `data:` field is counted and timed at the chunk that completes
    it (the first against `arrived_at`, the next ones against the event before); events
    are found by a bytes search for the blank line that ends them, and only the last few
    bytes of an unfinished event are carried to the next chunk. `usage()` reads the last
    `usage` object found in the response's final bytes, parsed once, at the end."""

    __slots__ = (
        "_arrived_at",
        "_clock",
        "_data",
        "_last_event_at",
        "_on_first",
        "_on_gap",
        "_recent",
        "_recent_bytes",
        "_sep",
        "_sse",
        "_tail",
        "_window",
        "events",
        "first_event_at",
    )

    def __init__(
        self,
        *,
        sse: bool,
        arrived_at: float,
        on_first: Observe,
        on_gap: Observe,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._sse = sse
        self._arrived_at = arrived_at
        self._on_first = on_first
        self._on_gap = on_gap
        self._clock = clock
        self._window = SSE_WINDOW if sse else JSON_WINDOW
        self._recent: list[bytes] = []
        self._recent_bytes = 0
        self._sep: bytes | None = None  # b"\n\n" or b"\r\n\r\n", from the first line's end
        self._tail = b""  # the last bytes of an unfinished event (b"": none is open)
        self._data = False  # the unfinished event has a data field
        self._last_event_at = 0.0
        self.events = 0  # data events seen
        self.first_event_at: float | None = None

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        # the end of the response, as references: trimmed to the window now and then
        self._recent.append(chunk)
        self._recent_bytes += len(chunk)
        if self._recent_bytes > 2 * self._window:
            self._trim()
        if not self._sse:
            return
        sep = self._sep
        if sep is not None and not self._tail:
            # the usual token stream: each read is one whole event; inline, as it is per event
            end = chunk.find(sep)
            if end >= 0 and end == len(chunk) - len(sep):
                if _DATA in chunk:
                    now = self._clock()
                    self.events += 1
                    if self.first_event_at is None:
                        self.first_event_at = now
                        self._on_first(now - self._arrived_at)
                    else:
                        self._on_gap(now - self._last_event_at)
                    self._last_event_at = now
                return
        self._scan(chunk)

    def _trim(self) -> None:
        """Keep the fewest last chunks that still hold the window."""
        kept = 0
        for index in range(len(self._recent) - 1, -1, -1):
            kept += len(self._recent[index])
            if kept >= self._window:
                del self._recent[:index]
                break
        self._recent_bytes = kept

    def usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens of the response's last `usage` object, if any."""
        if not self._recent:
            return None
        end = b"".join(self._recent)[-self._window :]
        at = len(end)
        for _ in range(_USAGE_TRIES):
            at = end.rfind(_USAGE, 0, at)
            if at == -1:
                return None
            found = _usage_at(end, at + len(_USAGE))
            if found is not None:
                return found
        return None

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
                self._data = False
                start = at + size - len(tail)
                found = True
        while (end := chunk.find(sep, start)) != -1:
            if self._data or chunk.find(_DATA, start, end) != -1:
                completed += 1
            self._data = False
            start = end + size
            found = True
        if start < len(chunk):
            if not self._data:
                self._data = chunk.find(_DATA, start) != -1
            # never a copy of more than the few bytes kept
            kept = chunk[max(start, len(chunk) - _TAIL) :]
            self._tail = kept if found else (tail + kept)[-_TAIL:]
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

    def _events(self, count: int) -> None:
        """`count` data events completed in the chunk that arrived now."""
        now = self._clock()
        self.events += count
        if self.first_event_at is None:
            self.first_event_at = now
            self._on_first(now - self._arrived_at)
        else:
            self._on_gap(now - self._last_event_at)
        for _ in range(count - 1):
            self._on_gap(0.0)  # arrived in the same read as the one before
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
        usage, _ = json.JSONDecoder().raw_decode(rest.decode("utf-8", "replace"))
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
