"""The proxy's HPACK against the `hpack` package, an independent implementation: what one
encodes the other decodes, the dynamic table stays in step, and bad blocks are refused."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.hpack_codec import Decoder, DecodingError, NeverIndexed, encode

names = st.sampled_from(
    [b":path", b":authority", b"content-type", b"x-meta", b"x-meta-bin", b"grpc-timeout",
     b"user-agent", b"authorization", b"x-" + b"n" * 40]
)  # fmt: skip
values = st.binary(min_size=0, max_size=300).map(lambda raw: raw.replace(b"\x00", b"0"))
header_lists = st.lists(st.tuples(names, values), min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(header_lists, st.booleans()), min_size=1, max_size=8))
def test_blocks_from_hpack_decode_in_step(blocks: list[tuple[list[tuple[bytes, bytes]], bool]]):
    """A sequence of blocks from one hpack encoder (dynamic table, Huffman or not)."""
    encoder, decoder = hpack.Encoder(), Decoder()
    for headers, huffman in blocks:
        decoded, fits = decoder.decode(encoder.encode(headers, huffman=huffman))
        assert fits
        assert [tuple(field) for field in decoded] == headers


@settings(max_examples=200, deadline=None)
@given(header_lists)
def test_our_blocks_decode_with_hpack(headers: list[tuple[bytes, bytes]]) -> None:
    decoder = hpack.Decoder()
    decoder.max_header_list_size = 1 << 20
    decoded = decoder.decode(encode(headers), raw=True)
    assert [tuple(field) for field in decoded] == headers


def test_never_indexed_fields_stay_never_indexed() -> None:
    encoder = hpack.Encoder()
    block = encoder.encode([hpack.NeverIndexedHeaderTuple(b"authorization", b"Bearer k")])
    [field], _ = Decoder().decode(block)
    assert type(field) is NeverIndexed
    [again] = hpack.Decoder().decode(encode([field]), raw=True)
    assert isinstance(again, hpack.NeverIndexedHeaderTuple)


def test_a_table_size_update_evicts() -> None:
    encoder, decoder = hpack.Encoder(), Decoder()
    headers = [(b"x-a", b"1" * 100), (b"x-b", b"2" * 100)]
    decoder.decode(encoder.encode(headers))
    encoder.header_table_size = 0  # the next block starts with a size update to 0
    assert decoder.decode(encoder.encode(headers))[0] == headers
    encoder.header_table_size = 4096
    assert decoder.decode(encoder.encode(headers))[0] == headers


def test_static_fields_are_indexed() -> None:
    assert encode([(b":status", b"200")]) == b"\x88"
    assert encode([(b":method", b"POST"), (b":scheme", b"http")]) == b"\x83\x86"


def test_the_list_size_limit_is_reported_after_the_whole_block() -> None:
    decoder = Decoder(max_list_size=100)
    headers, fits = decoder.decode(hpack.Encoder().encode([(b"x-big", b"v" * 200)]))
    assert not fits
    assert headers == [(b"x-big", b"v" * 200)]


@pytest.mark.parametrize(
    "block",
    [
        b"\xbf",  # an index that needs more bytes, and none follow
        b"\xff\xff\xff\xff\xff\xff\x7f",  # an integer of more than five bytes
        b"\xbe",  # index 62: the dynamic table is empty
        b"\x80",  # index 0
        b"\x40\x05ab",  # a name shorter than its length
        b"\x00\x81\xff\x00",  # a Huffman string that decodes to nothing valid
        b"\x82\x3f\xe1\x1f",  # a table size update after a field
        b"\x3f\xe2\x1f",  # a table size larger than the limit (4096)
    ],
)
def test_bad_blocks_are_refused(block: bytes) -> None:
    with pytest.raises(DecodingError):
        Decoder().decode(block)
