"""gRPC messages counted from their 5-byte prefixes however the byte stream is cut."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from proxy.grpc_call import MessageCounter

from .h2peers import grpc_frame


@given(
    st.lists(st.binary(max_size=300), max_size=20),
    st.lists(st.integers(min_value=0, max_value=7000), max_size=12),
)
def test_messages_are_counted_wherever_the_stream_is_cut(
    messages: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(grpc_frame(message) for message in messages)
    bounds = sorted({0, len(stream), *(cut for cut in cuts if cut < len(stream))})
    counter = MessageCounter()
    counted = sum(counter.feed(stream[a:b]) for a, b in pairwise(bounds))
    assert counted == len(messages)
    assert counter.between_messages


def test_a_message_cut_inside_its_prefix_is_not_between_messages() -> None:
    counter = MessageCounter()
    assert counter.feed(grpc_frame(b"one") + b"\x00\x00") == 1
    assert not counter.between_messages
    assert counter.feed(b"\x00\x00\x02ab") == 1
    assert counter.between_messages
