"""HPACK (RFC 7541) for the proxy's HTTP/2: a decoder that keeps the dynamic table its peer's
encoder drives, and an encoder that never indexes (literal fields only: no state to keep, a
few µs a block). Huffman decoding and the static table come from the `hpack` package."""

from __future__ import annotations

import re

from hpack.exceptions import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Header = tuple[bytes, bytes]

STATIC: tuple[Header, ...] = HeaderTable.STATIC_TABLE  # indexes 1 to 61
STATIC_LENGTH = len(STATIC)
_STATIC_FIELDS = {field: index for index, field in reversed(list(enumerate(STATIC, 1)))}
_STATIC_NAMES = {name: index for index, (name, _) in reversed(list(enumerate(STATIC, 1)))}
ENTRY_OVERHEAD = 32  # RFC 7541 §4.1
MAX_INTEGER_BYTES = 5  # enough for any length or index the proxy accepts (2^28)
HUFFMAN_CACHE = 1024  # decoded strings kept: clients send the same few values again and again
HUFFMAN_CACHED = 128  # ...if they are short: a cache of long ones would hold megabytes
# RFC 9113 §8.2.1: a name has no control, space, upper-case, non-ASCII or colon (but a
# pseudo-header's first) byte; a value no NUL, CR or LF
_BAD_NAME = re.compile(rb"[^!-9;-@\[-~]")
_BAD_VALUE = re.compile(rb"[\0\r\n]")
_BLANK = (0x20, 0x09)


class DecodingError(Exception):
    """The header block cannot be decoded: a COMPRESSION_ERROR for the whole connection."""


class NeverIndexed(tuple[bytes, bytes]):
    """A field its sender marked "never indexed" (a secret, say): RFC 7541 §6.2.3 asks an
    intermediary to encode it the same way."""

    __slots__ = ()


class Malformed(tuple[bytes, bytes]):
    """A field that breaks RFC 9113's field syntax, kept in the dynamic table as it came (the
    table must stay in step) and marked, so a block that refers to it is malformed too."""

    __slots__ = ()


class Decoder:
    """Decodes header blocks; `decode` raises DecodingError on a block it cannot decode."""

    def __init__(self, *, max_table_size: int = 4096, max_list_size: int = 65536) -> None:
        self._limit = max_table_size  # what our SETTINGS_HEADER_TABLE_SIZE allows
        self._max = max_table_size  # what the peer's encoder chose within it
        self._size = 0
        self._table: list[Header] = []  # newest last: index 62 is self._table[-1]
        self._max_list_size = max_list_size
        self._huffman: dict[bytes, bytes] = {}

    def decode(self, block: bytes) -> tuple[list[Header], bool]:
        """The fields, and whether the block is acceptable: its size within the list limit,
        each field well-formed (a request that is not is reset, RFC 9113 §8.1.1). The whole
        block is read either way, so the table stays in step with the peer's."""
        headers: list[Header] = []
        size = 0
        well_formed = True
        pos, end = 0, len(block)
        while pos < end:
            byte = block[pos]
            if byte & 0x80:  # indexed field
                index, pos = _integer(block, pos, 7)
                field = self._field(index)
                if type(field) is Malformed:
                    well_formed = False
            elif byte & 0x40:  # literal, added to the table
                index, pos = _integer(block, pos, 6)
                name, pos = self._name(block, pos, index)
                value, pos = self._string(block, pos)
                field = (name, value)
                if not _well_formed(name, value):
                    field = Malformed(field)
                    well_formed = False
                self._add(field)
            elif byte & 0x20:  # table size update
                new_max, pos = _integer(block, pos, 5)
                if new_max > self._limit or headers:
                    raise DecodingError("invalid dynamic table size update")
                self._max = new_max
                self._evict()
                continue
            else:  # literal not added (0x00), or never indexed (0x10)
                index, pos = _integer(block, pos, 4)
                name, pos = self._name(block, pos, index)
                value, pos = self._string(block, pos)
                field = NeverIndexed((name, value)) if byte & 0x10 else (name, value)
                if not _well_formed(name, value):
                    well_formed = False
            headers.append(field)
            size += len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        return headers, well_formed and size <= self._max_list_size

    def _field(self, index: int) -> Header:
        if 0 < index <= STATIC_LENGTH:
            return STATIC[index - 1]
        dynamic = index - STATIC_LENGTH
        if 0 < dynamic <= len(self._table):
            return self._table[-dynamic]
        raise DecodingError(f"no header table entry {index}")

    def _name(self, block: bytes, pos: int, index: int) -> tuple[bytes, int]:
        if index:
            return self._field(index)[0], pos
        return self._string(block, pos)

    def _string(self, block: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(block):
            raise DecodingError("truncated header block")
        huffman = block[pos] & 0x80
        length, pos = _integer(block, pos, 7)
        end = pos + length
        if end > len(block):
            raise DecodingError("truncated header block")
        raw = block[pos:end]
        if not huffman:
            return raw, end
        text = self._huffman.get(raw)
        if text is None:
            try:
                text = decode_huffman(raw)
            except HPACKDecodingError as exc:
                raise DecodingError(str(exc)) from exc
            if length <= HUFFMAN_CACHED:
                if len(self._huffman) >= HUFFMAN_CACHE:
                    self._huffman.clear()
                self._huffman[raw] = text
        return text, end

    def _add(self, field: Header) -> None:
        size = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        if size > self._max:  # larger than the whole table: it empties it (§4.4)
            self._table.clear()
            self._size = 0
            return
        self._table.append(field)
        self._size += size
        self._evict()

    def _evict(self) -> None:
        table = self._table
        while self._size > self._max and table:
            name, value = table.pop(0)
            self._size -= len(name) + len(value) + ENTRY_OVERHEAD


def _well_formed(name: bytes, value: bytes) -> bool:
    start = 1 if name[:1] == b":" else 0
    return (
        len(name) > start
        and _BAD_NAME.search(name, start) is None
        and _BAD_VALUE.search(value) is None
        and (not value or (value[0] not in _BLANK and value[-1] not in _BLANK))
    )


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """An integer with an N-bit prefix (§5.1); returns it and the position after it."""
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    for _ in range(MAX_INTEGER_BYTES):
        if pos >= len(block):
            raise DecodingError("truncated integer")
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise DecodingError("integer too large")


def encode(headers: list[Header]) -> bytes:
    """A header block of literal fields that never touch the dynamic table (fields of the
    static table as their index); a never-indexed field stays never indexed."""
    out = bytearray()
    for field in headers:
        never = type(field) is NeverIndexed
        if not never:
            index = _STATIC_FIELDS.get(field)
            if index is not None:
                out.append(0x80 | index)  # every static index fits in 7 bits
                continue
        name, value = field
        flag = 0x10 if never else 0x00
        index = _STATIC_NAMES.get(name)
        if index is None:
            out.append(flag)
            _append_integer(out, len(name), 7, 0)
            out += name
        else:
            _append_integer(out, index, 4, flag)
        _append_integer(out, len(value), 7, 0)
        out += value
    return bytes(out)


def _append_integer(out: bytearray, value: int, prefix: int, flags: int) -> None:
    mask = (1 << prefix) - 1
    if value < mask:
        out.append(flags | value)
        return
    out.append(flags | mask)
    value -= mask
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
