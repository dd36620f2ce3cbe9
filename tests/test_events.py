"""The response scanner: whatever the chunks a stream is cut into, the same events are
counted and timed at the chunk that completes them, and the same `usage` is read, as a
plain reading of the whole stream finds."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.events import EVENT_MAX, JSON, SSE, ResponseScanner, response_kind
from proxy.metrics import Histogram

WHOLE_NUMBERS = tuple(float(n) for n in range(1000))  # a bucket for each number of chunks


def observed(histogram: Histogram) -> list[float]:
    """The values observed, smallest first: each is a whole number of chunks, in its own
    bucket."""
    return [
        bound for bound, count in zip(histogram.buckets, histogram.counts, strict=False)
        for _ in range(count)
    ]  # fmt: skip


class Recorder:
    """A scanner fed chunk by chunk, its clock the index of the chunk being fed."""

    def __init__(self, *, sse: bool = True) -> None:
        self.now = 0.0
        self.times = (Histogram(WHOLE_NUMBERS), Histogram(WHOLE_NUMBERS))
        self.scanner = ResponseScanner(
            sse=sse,
            arrived_at=-1.0,
            first=self.times[0],
            gaps=self.times[1],
            clock=lambda: self.now,
        )

    @property
    def first(self) -> list[float]:
        return observed(self.times[0])

    @property
    def gaps(self) -> list[float]:
        assert self.times[1].total == sum(observed(self.times[1]))
        return observed(self.times[1])

    def feed(self, chunks: list[bytes]) -> Recorder:
        for index, chunk in enumerate(chunks):
            self.now = float(index)
            self.scanner.feed(chunk)
        return self


def expected_events(chunks: list[bytes]) -> list[int]:
    """The index of the chunk completing each data event, from the whole stream at once."""
    stream = b"".join(chunks)
    newline = stream.find(b"\n")
    if newline == -1:
        return []
    separator = b"\r\n\r\n" if newline and stream[newline - 1] == 13 else b"\n\n"
    ends = []
    offset = 0
    for event in stream.split(separator)[:-1]:  # the last piece is unfinished
        offset += len(event) + len(separator)
        if b"data:" in event:
            ends.append(offset - 1)  # the separator's last byte
    indexes = []
    boundary, index = 0, -1
    for end in ends:
        while boundary <= end:
            index += 1
            boundary += len(chunks[index])
        indexes.append(index)
    return indexes


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def check_events(chunks: list[bytes]) -> None:
    recorder = Recorder().feed(chunks)
    indexes = expected_events(chunks)
    assert recorder.scanner.events == len(indexes)
    if indexes:
        assert recorder.first == [indexes[0] + 1.0]  # against arrived_at = -1
        assert recorder.gaps == sorted(float(b - a) for a, b in itertools.pairwise(indexes))
    else:
        assert recorder.first == recorder.gaps == []


SSE_EVENTS = st.sampled_from(
    [
        b'data: {"choices": [{"delta": {"content": "hi"}}]}',
        b"data: [DONE]",
        b": ping",  # a comment: not a data event
        b"event: update\ndata: x",
        b"data: line one\ndata: line two",
        b"id: 7",
        b"data:",
        b"",
    ]
)


@settings(max_examples=400)
@given(
    events=st.lists(SSE_EVENTS, max_size=12),
    crlf=st.booleans(),
    unfinished=st.binary(max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_sse_events_are_the_same_however_the_stream_is_cut(
    events: list[bytes], crlf: bool, unfinished: bytes, cuts: list[int]
) -> None:
    line_end = b"\r\n" if crlf else b"\n"
    stream = b"".join(event.replace(b"\n", line_end) + line_end * 2 for event in events)
    check_events(split(stream + unfinished, cuts))


@settings(max_examples=400)
@given(
    stream=st.lists(st.sampled_from([b"\n", b"\r", b"\r\n", b"data:", b"da", b"ta:", b"x"])),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
)
def test_arbitrary_bytes_are_counted_as_a_whole_reading_counts_them(
    stream: list[bytes], cuts: list[int]
) -> None:
    check_events(split(b"".join(stream), cuts))


def openai_stream(tokens: int, usage: dict[str, int] | None, *, crlf: bool = False) -> bytes:
    """An OpenAI chat.completion.chunk stream; `usage` in a last chunk as include_usage
    sends it, `"usage": null` in the others."""
    line_end = b"\r\n" if crlf else b"\n"
    events = []
    for i in range(tokens):
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": None}],
            "usage": None,
        }
        events.append(b"data: " + json.dumps(chunk).encode())
    if usage is not None:
        last = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": []}
        events.append(b"data: " + json.dumps({**last, "usage": usage}).encode())
    events.append(b"data: [DONE]")
    return b"".join(event + line_end * 2 for event in events)


@settings(max_examples=200)
@given(
    tokens=st.integers(min_value=0, max_value=40),
    prompt=st.integers(min_value=0, max_value=10**6),
    completion=st.integers(min_value=0, max_value=10**6),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=40),
)
def test_the_usage_of_a_stream_is_read_however_it_is_cut(
    tokens: int, prompt: int, completion: int, crlf: bool, cuts: list[int]
) -> None:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": 0}
    chunks = split(openai_stream(tokens, usage, crlf=crlf), cuts)

    recorder = Recorder().feed(chunks)

    assert recorder.scanner.usage() == (prompt, completion)
    assert recorder.scanner.events == tokens + 2  # the usage chunk and [DONE] are events


@given(cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_a_stream_without_a_usage_chunk_counts_no_tokens(cuts: list[int]) -> None:
    """include_usage not asked: every chunk says "usage": null, none has counts."""
    recorder = Recorder().feed(split(openai_stream(30, None), cuts))

    assert recorder.scanner.usage() is None
    assert recorder.scanner.events == 31


def test_continuous_usage_counts_the_last_totals_once() -> None:
    """vLLM's continuous_usage_stats: every chunk carries the running totals."""
    events = [
        b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": %d}}\n\n' % i
        for i in range(1, 6)
    ]

    recorder = Recorder().feed(events)

    assert recorder.scanner.usage() == (9, 5)


@settings(max_examples=200)
@given(
    content=st.text(max_size=3000),
    prompt=st.integers(min_value=0, max_value=10**6),
    completion=st.integers(min_value=0, max_value=10**6),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_the_usage_of_a_json_body_is_read_however_it_is_cut(
    content: str, prompt: int, completion: int, cuts: list[int]
) -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        # what the model wrote may say "usage" too: JSON escapes its quotes
        "choices": [{"message": {"role": "assistant", "content": content + ' "usage": {}'}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        "system_fingerprint": None,
    }
    chunks = split(json.dumps(body, ensure_ascii=False).encode(), cuts)

    recorder = Recorder(sse=False).feed(chunks)

    assert recorder.scanner.usage() == (prompt, completion)
    assert recorder.scanner.events == 0  # a JSON body has no events
    assert recorder.first == recorder.gaps == []


def test_the_responses_api_spelling_is_read_too() -> None:
    body = b'{"object": "response", "usage": {"input_tokens": 12, "output_tokens": 34}}'

    assert Recorder(sse=False).feed([body]).scanner.usage() == (12, 34)


def test_a_long_stream_holds_nothing_but_its_last_usage_event() -> None:
    chunks = [b"data: %d\n\n" % i for i in range(10_000)]
    chunks[5000] = b'data: {"usage": {"prompt_tokens": 1, "completion_tokens": 2}}\n\n'

    scanner = Recorder().feed(chunks).scanner

    assert scanner._usage is chunks[5000]  # a reference, not a copy
    assert (scanner._open, scanner._recent) == ([], [])
    assert scanner.events == 10_000
    assert scanner.usage() == (1, 2)


def test_an_event_too_large_to_hold_is_counted_without_its_usage() -> None:
    usage = b'"usage": {"prompt_tokens": 1, "completion_tokens": 2}'
    big = b"data: " + b"x" * (EVENT_MAX + 2000) + usage + b"\n\n"
    pieces = [big[i : i + 1000] for i in range(0, len(big), 1000)]

    scanner = Recorder().feed([b"data: a\n\n", *pieces, b"data: [DONE]\n\n"]).scanner

    assert scanner.events == 3
    assert scanner.usage() is None
    assert scanner._open == []


def test_events_in_one_read_are_apart_by_nothing() -> None:
    recorder = Recorder().feed([b"data: a\n\ndata: b\n\n", b"data: c\n\ndata: d\n\ndata: e\n\n"])

    assert recorder.first == [1.0]
    assert recorder.gaps == [0.0, 0.0, 0.0, 1.0]


def test_which_responses_are_scanned() -> None:
    assert response_kind([(b"Content-Type", b"text/event-stream; charset=utf-8")]) == SSE
    assert response_kind([(b"content-type", b"Application/JSON")]) == JSON
    assert response_kind([(b"Content-Type", b"text/plain")]) is None
    assert response_kind([(b"Content-Length", b"3")]) is None
