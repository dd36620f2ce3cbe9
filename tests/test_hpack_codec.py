"""The proxy's HPACK against the `hpack` package, an independent implementation: what one
encodes the other decodes, the dynamic table stays in step, bad blocks are refused, and
fields that break RFC 9113's syntax mark their block malformed."""

from __future__ import annotations

import tracemalloc

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.hpack_codec import Decoder, DecodingError, NeverIndexed, encode

names = st.sampled_from(
    [b":path", b":authority", b"content-type", b"x-meta", b"x-meta-bin", b"grpc-timeout",
     b"user-agent", b"authorization", b"x-" + b"n" * 40]
)  # fmt: skip
values = st.binary(min_size=0, max_size=300)
header_lists = st.lists(st.tuples(names, values), min_size=0, max_size=12)
odd_names = st.one_of(names, st.binary(max_size=12), st.sampled_from([b"", b":", b"X-Up", b"a b"]))


def well_formed(name: bytes, value: bytes) -> bool:
    """RFC 9113 §8.2.1, as its text reads, byte by byte."""
    rest = name[1:] if name.startswith(b":") else name
    if not rest or any(c <= 0x20 or 0x41 <= c <= 0x5A or c >= 0x7F or c == 0x3A for c in rest):
        return False
    if any(c in (0x00, 0x0A, 0x0D) for c in value):
        return False
    return not value or (value[:1] not in (b" ", b"\t") and value[-1:] not in (b" ", b"\t"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(header_lists, st.booleans()), min_size=1, max_size=8))
def test_blocks_from_hpack_decode_in_step(blocks: list[tuple[list[tuple[bytes, bytes]], bool]]):
    """A sequence of blocks from one hpack encoder (dynamic table, Huffman or not): the fields
    come out as they went in, and a block is acceptable exactly when each field is
    well-formed (an indexed copy of a malformed field included)."""
    encoder, decoder = hpack.Encoder(), Decoder()
    for headers, huffman in blocks:
        decoded, acceptable = decoder.decode(encoder.encode(headers, huffman=huffman))
        assert [tuple(field) for field in decoded] == headers
        assert acceptable == all(well_formed(name, value) for name, value in headers)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(odd_names, st.binary(max_size=8)), min_size=1, max_size=6))
def test_malformed_names_are_caught(headers: list[tuple[bytes, bytes]]) -> None:
    _, acceptable = Decoder().decode(encode(headers))
    assert acceptable == all(well_formed(name, value) for name, value in headers)


def test_an_indexed_copy_of_a_malformed_field_is_malformed() -> None:
    encoder, decoder = hpack.Encoder(), Decoder()
    assert not decoder.decode(encoder.encode([(b"x-a", b"line\nbreak")]))[1]
    block = encoder.encode([(b"x-a", b"line\nbreak")])
    assert block == b"\xbe"  # the dynamic table's entry, by index
    assert not decoder.decode(block)[1]
    assert decoder.decode(encoder.encode([(b"x-a", b"fine")]))[1]


def huffman_literal(name: bytes, value_code: bytes) -> bytes:
    """A literal field (not indexed) whose value is Huffman-coded already."""
    assert len(name) < 127
    assert 127 <= len(value_code) < 127 + 128 * 128
    rest = len(value_code) - 127  # the length, in a 7-bit prefix and two more bytes
    return (bytes([0, len(name)]) + name + bytes([0xFF, rest & 0x7F | 0x80, rest >> 7])
            + value_code)  # fmt: skip


def test_long_huffman_strings_are_not_kept() -> None:
    """Decoded Huffman strings are cached for the next block; long ones must not be, or a
    peer sending distinct 16 KiB values would make each connection hold megabytes."""
    huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    filler = huffman.encode(b"aeiostaa") * 3000  # 5-bit codes: 8 of them fill 5 bytes
    words = [bytes(b"012aceiost"[digit - 0x30] for digit in b"%08d" % n) for n in range(100)]
    blocks = [huffman_literal(b"x-v", huffman.encode(word) + filler) for word in words]
    decoder = Decoder(max_list_size=1 << 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for block in blocks:
            decoder.decode(block)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 512 * 1024, held  # 100 values of 24 KiB: 4 MB if they were kept


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
