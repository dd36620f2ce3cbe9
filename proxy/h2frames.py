"""The HTTP/2 wire (RFC 9113 §4-6): frame layouts, the connection error, and the reader that
cuts a byte stream into frames, checks each one's shape, puts header blocks back together
from CONTINUATION frames, decodes them, and hands each frame's meaning to its owner."""

from __future__ import annotations

import struct
from typing import Protocol

from .hpack_codec import Decoder, Header

Headers = list[Header]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_WINDOW = 2**31 - 1
MAX_FRAME_SIZE = 16384  # what we accept (the protocol's default)
MAX_HEADER_LIST_SIZE = 65536  # as HTTP/1.1's limit on a whole head
MAX_HEADER_BLOCK = 4 * MAX_HEADER_LIST_SIZE  # compressed, CONTINUATIONs included

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
SELF_DEPENDENT = 0x100  # not a wire flag: the reader's note on a HEADERS frame
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB
HEADER_TABLE_SIZE, ENABLE_PUSH, SETTINGS_MAX_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME, SETTINGS_MAX_LIST = 0x4, 0x5, 0x6

FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits, as 16 + 8), type, flags, stream id
SETTING = struct.Struct(">HL")
TWO_WORDS = struct.Struct(">LL")
WORD = struct.Struct(">L")
STREAM_MASK = 0x7FFFFFFF


class ProtocolViolation(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY(`code`)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


def data_frame_header(stream_id: int, size: int, flags: int = 0) -> bytes:
    return FRAME_HEADER.pack(size >> 8, size & 0xFF, DATA, flags, stream_id)


def header_frames(stream_id: int, block: bytes, flags: int, largest: int) -> list[bytes]:
    """HEADERS, and CONTINUATION frames when the block is larger than a frame may be."""
    if len(block) <= largest:
        return [frame(HEADERS, flags | END_HEADERS, stream_id, block)]
    pieces = [block[pos : pos + largest] for pos in range(0, len(block), largest)]
    out = [frame(HEADERS, flags, stream_id, pieces[0])]
    out += [frame(CONTINUATION, 0, stream_id, piece) for piece in pieces[1:-1]]
    out.append(frame(CONTINUATION, END_HEADERS, stream_id, pieces[-1]))
    return out


class FrameHandler(Protocol):
    """What each frame means to the connection that owns the reader."""

    def on_data(self, stream_id: int, flags: int, data: bytes, flow: int) -> None: ...
    def on_header_block(self, stream_id: int, flags: int, headers: Headers, ok: bool) -> None: ...
    def on_rst_stream(self, stream_id: int, code: int) -> None: ...
    def on_settings(self, settings: list[tuple[int, int]]) -> None: ...
    def on_ping(self, payload: bytes) -> None: ...
    def on_goaway(self, last_stream_id: int, code: int) -> None: ...
    def on_window_update(self, stream_id: int, increment: int) -> None: ...
    def on_stream_error(self, stream_id: int, code: int) -> None: ...


class FrameReader:
    """Frames out of the byte stream; `feed` raises ProtocolViolation (or the HPACK
    decoder's DecodingError) for a connection error."""

    def __init__(self, handler: FrameHandler, *, preface: bool) -> None:
        self._handler = handler
        self._preface = preface  # a server reads the client's preface first
        self._buffer = b""
        self._block: tuple[int, int, bytearray] | None = None  # HEADERS awaiting CONTINUATION
        self._continuations = 0  # CONTINUATION frames of that block so far
        self._decoder = Decoder(max_list_size=MAX_HEADER_LIST_SIZE)
        self.stopped = False  # the connection is over: the rest is not read

    def feed(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        pos = self._frames(buffer)
        if pos < len(buffer):
            self._buffer = buffer[pos:]

    def _frames(self, buffer: bytes) -> int:
        """Handle every whole frame in `buffer`; the position of the first incomplete one."""
        pos, size = 0, len(buffer)
        if self._preface:
            if not (buffer.startswith(PREFACE) or PREFACE.startswith(buffer)):
                raise ProtocolViolation(PROTOCOL_ERROR, "not the HTTP/2 connection preface")
            if size < len(PREFACE):
                return 0
            self._preface = False
            pos = len(PREFACE)
        handler = self._handler
        while size - pos >= 9 and not self.stopped:
            high, low, kind, flags, stream_id = FRAME_HEADER.unpack_from(buffer, pos)
            length = high << 8 | low
            if length > MAX_FRAME_SIZE:
                raise ProtocolViolation(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            end = pos + 9 + length
            if end > size:
                break
            payload = buffer[pos + 9 : end]
            pos = end
            stream_id &= STREAM_MASK
            if self._block is not None and kind != CONTINUATION:
                raise ProtocolViolation(PROTOCOL_ERROR, "a header block was interrupted")
            if kind == DATA:
                if not stream_id:
                    raise ProtocolViolation(PROTOCOL_ERROR, "DATA on stream 0")
                data = _unpad(flags, payload) if flags & PADDED else payload
                handler.on_data(stream_id, flags, data, length)
            elif kind == HEADERS:
                self._headers(flags, stream_id, payload)
            elif kind == CONTINUATION:
                self._continuation(flags, stream_id, payload)
            elif kind == WINDOW_UPDATE:
                if length != 4:
                    raise ProtocolViolation(FRAME_SIZE_ERROR, "a malformed WINDOW_UPDATE")
                handler.on_window_update(stream_id, WORD.unpack(payload)[0] & STREAM_MASK)
            elif kind == RST_STREAM:
                if not stream_id:
                    raise ProtocolViolation(PROTOCOL_ERROR, "RST_STREAM on stream 0")
                if length != 4:
                    raise ProtocolViolation(FRAME_SIZE_ERROR, "a malformed RST_STREAM")
                handler.on_rst_stream(stream_id, WORD.unpack(payload)[0])
            elif kind == SETTINGS:
                self._settings(flags, stream_id, payload)
            elif kind == PING:
                if stream_id:
                    raise ProtocolViolation(PROTOCOL_ERROR, "PING on a stream")
                if length != 8:
                    raise ProtocolViolation(FRAME_SIZE_ERROR, "a malformed PING")
                if not flags & ACK:
                    handler.on_ping(payload)
            elif kind == GOAWAY:
                if stream_id:
                    raise ProtocolViolation(PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    raise ProtocolViolation(FRAME_SIZE_ERROR, "a malformed GOAWAY")
                last, code = TWO_WORDS.unpack_from(payload)
                handler.on_goaway(last & STREAM_MASK, code)
            elif kind == PRIORITY:
                if not stream_id:
                    raise ProtocolViolation(PROTOCOL_ERROR, "PRIORITY on stream 0")
                if length != 5:
                    raise ProtocolViolation(FRAME_SIZE_ERROR, "a malformed PRIORITY")
                if WORD.unpack_from(payload)[0] & STREAM_MASK == stream_id:
                    handler.on_stream_error(stream_id, PROTOCOL_ERROR)  # depends on itself
            elif kind == PUSH_PROMISE:
                raise ProtocolViolation(PROTOCOL_ERROR, "server push is not enabled")
            # other frame types are extensions: ignored (§5.5)
        return pos

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = _unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                code = PROTOCOL_ERROR if flags & PADDED else FRAME_SIZE_ERROR
                raise ProtocolViolation(code, "HEADERS too short for its priority")
            if WORD.unpack_from(block)[0] & STREAM_MASK == stream_id:
                flags |= SELF_DEPENDENT  # a stream error (§5.3.1) once the block is decoded
            block = block[5:]
        if flags & END_HEADERS:
            self._decode(flags, stream_id, block)
        else:
            self._block = (stream_id, flags, bytearray(block))
            self._continuations = 0

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._block is None or self._block[0] != stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, "an unexpected CONTINUATION")
        _, first_flags, block = self._block
        block += payload
        self._continuations += 1
        # empty or tiny CONTINUATION frames grow no block but cost a frame each
        # (CVE-2024-27316 and kin): a block takes at most as many frames as it takes 1 KiB
        if len(block) > MAX_HEADER_BLOCK or self._continuations > MAX_HEADER_BLOCK // 1024:
            raise ProtocolViolation(ENHANCE_YOUR_CALM, "a header block too large")
        if flags & END_HEADERS:
            self._block = None
            self._decode(first_flags, stream_id, bytes(block))

    def _decode(self, flags: int, stream_id: int, block: bytes) -> None:
        headers, valid = self._decoder.decode(block)  # always: the table must stay in step
        valid = valid and not flags & SELF_DEPENDENT
        self._handler.on_header_block(stream_id, flags, headers, valid)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise ProtocolViolation(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolViolation(FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "a malformed SETTINGS")
        settings = [SETTING.unpack_from(payload, pos) for pos in range(0, len(payload), 6)]
        self._handler.on_settings(settings)


def _unpad(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ProtocolViolation(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]
