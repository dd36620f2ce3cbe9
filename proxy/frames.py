"""WebSocket frames on the wire: following frame boundaries in a stream, counting messages,
cutting the proxy's own pong out of a client's stream, and the control frames the proxy
writes itself."""

from __future__ import annotations

import os
import struct

PING, PONG, CLOSE = 0x9, 0xA, 0x8
_MAX_CONTROL = 125  # a control frame's payload is at most this long (RFC 6455, 5.5)


class FrameReader:
    """Follows frame boundaries in one direction of a WebSocket stream; while a pong
    answering the proxy's own ping may come, cuts that pong out of the stream."""

    __slots__ = (
        "_data",
        "_header",
        "_header_passed",
        "_held",
        "_pong",
        "_pongs_due",
        "_remaining",
        "data_seen",
        "heard",
        "watching",
    )

    def __init__(self) -> None:
        self._remaining = 0  # payload bytes of the current frame still to pass
        self._header = b""  # a frame header split across reads
        self._data = False  # the current frame is a data frame (not a control frame)
        # what went by since the tunnel's timer last looked (and cleared them): flags, not
        # times, so that the stream pays one store for each
        self.data_seen = False  # bytes of a data frame
        self.heard = False  # any bytes at all
        # while our pong may come: feed_watching() instead of feed()
        self.watching = False
        self._pong: bytes | None = None  # the payload of our pings' pongs
        self._pongs_due = 0  # our pings not answered yet (more than one without a timeout)
        self._held: bytearray | None = None  # a pong frame held back until it is whole
        self._header_passed = False  # the split header's first bytes were passed on

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._header

    def expect_pong(self, payload: bytes) -> None:
        """One more ping of ours awaits its pong: a pong with this payload (the same for every
        ping) is ours, cut out and reported, as many times as pings were sent."""
        self._pong = payload
        self._pongs_due += 1
        self.watching = True

    def feed(self, data: bytes) -> int:
        """Consume `data` (all of it is passed on); the number of messages whose last frame
        ended in it."""
        self.heard = True
        messages = 0
        position, size = 0, len(data)
        while position < size:
            if self._remaining:
                step = min(self._remaining, size - position)
                self._remaining -= step
                position += step
                if self._data:
                    self.data_seen = True
                continue
            known = len(self._header)
            header = self._header + data[position : position + 14]
            header_size, length = _header_size(header)
            if len(header) < header_size:
                self._header = header
                self._header_passed = True
                return messages
            position += header_size - known
            self._header = b""
            self._remaining = length
            fin, opcode = header[0] & 0x80, header[0] & 0x0F
            self._data = opcode < 8
            if self._data:
                self.data_seen = True
                if fin:  # the last frame of a text, binary or continued message
                    messages += 1
        return messages

    def feed_watching(self, data: bytes) -> tuple[int, bytes, bool]:
        """feed(), while our pong may come: the messages that ended, the bytes to pass on
        (`data` without our pong; copied only here) and whether our pong came."""
        self.heard = True
        out = bytearray()
        answered = False
        messages = 0
        position, size = 0, len(data)
        while position < size:
            if self._remaining:
                step = min(self._remaining, size - position)
                piece = data[position : position + step]
                self._remaining -= step
                position += step
                if self._held is not None:
                    self._held += piece
                    if not self._remaining:
                        answered |= self._settle(out)
                    continue
                out += piece
                if self._data:
                    self.data_seen = True
                continue
            known = len(self._header)
            if not known:
                self._header_passed = False
            header = self._header + data[position : position + 14]
            header_size, length = _header_size(header)
            if len(header) < header_size:  # the rest comes later: pass on what may be
                if self._header_passed:
                    out += header[known:]
                self._header = header
                break
            position += header_size - known
            fin, opcode = header[0] & 0x80, header[0] & 0x0F
            self._remaining = length
            self._data = opcode < 8
            # a frame whose first bytes were passed before we watched cannot be ours
            if opcode == PONG and not self._header_passed and length <= _MAX_CONTROL:
                self._held = bytearray(header[:header_size])
                if not length:
                    answered |= self._settle(out)
            else:
                out += header[known:header_size] if self._header_passed else header[:header_size]
                if self._data:
                    self.data_seen = True
                    if fin:
                        messages += 1
            self._header = b""
            self._header_passed = False
        pending_header = bool(self._header) and not self._header_passed
        self.watching = self._pong is not None or self._held is not None or pending_header
        return messages, bytes(out), answered

    def _settle(self, out: bytearray) -> bool:
        """A held pong is whole: True if it answers our ping (then it is dropped), else it
        joins `out`."""
        frame, self._held = self._held, None
        assert frame is not None
        header_size, _ = _header_size(frame)
        payload = bytes(frame[header_size:])
        if frame[1] & 0x80:  # masked, as a client's frames must be
            mask = frame[header_size - 4 : header_size]
            payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        if payload == self._pong:
            self._pongs_due -= 1
            if not self._pongs_due:
                self._pong = None
            return True
        out += frame
        return False


def _header_size(header: bytes | bytearray) -> tuple[int, int]:
    """(the size of the frame header that starts `header`, the payload length); the
    length is only meaningful once `header` holds the whole header. Needs 2 bytes."""
    if len(header) < 2:
        return 2, 0
    length = header[1] & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0)
    size += 4 if header[1] & 0x80 else 0  # masked
    if len(header) < size:
        return size, 0
    if length == 126:
        length = struct.unpack_from("!H", header, 2)[0]
    elif length == 127:
        length = struct.unpack_from("!Q", header, 2)[0]
    return size, length


def close_frame(code: int, reason: bytes, *, masked: bool) -> bytes:
    return control_frame(CLOSE, struct.pack("!H", code) + reason[:123], masked=masked)


def control_frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    mask = os.urandom(4)
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + body
