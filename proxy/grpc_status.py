"""gRPC status codes, the proxy's refusals as trailers-only responses, and the error table
that maps each of the proxy's errors to its gRPC status."""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]

# the 17 codes of grpc/status.h, by number
CODE_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
OK, CANCELLED, UNKNOWN = 0, 1, 2
DEADLINE_EXCEEDED = 4
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# the contract's table: each error the proxy answers itself, as a gRPC status
FOR_ERROR = {
    "not_ready": UNAVAILABLE,
    "draining": UNAVAILABLE,
    "queue_full": RESOURCE_EXHAUSTED,
    "queue_timeout": RESOURCE_EXHAUSTED,
    "unauthorized": UNAUTHENTICATED,
    "upstream_unavailable": UNAVAILABLE,
    "upstream_timeout": DEADLINE_EXCEEDED,
    "request_timeout": DEADLINE_EXCEEDED,  # the client too slow to send its first message
}

# RST_STREAM error codes as gRPC clients read them (gRPC's PROTOCOL-HTTP2.md)
FOR_RESET = {0x8: CANCELLED, 0x7: UNAVAILABLE, 0xB: RESOURCE_EXHAUSTED}


def name(code: int | None) -> str:
    """The code's name; a code outside the table (or none at all) is UNKNOWN, as clients read it."""
    if code is None or not 0 <= code < len(CODE_NAMES):
        return "UNKNOWN"
    return CODE_NAMES[code]


def status_of(headers: Headers) -> int | None:
    """The `grpc-status` of a trailer block (or of trailers-only headers)."""
    for key, value in headers:
        if key == b"grpc-status":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def encode_message(message: str) -> bytes:
    """Percent-encode `grpc-message` as the gRPC spec asks: bytes outside 0x20-0x7E and '%'."""
    return b"".join(
        bytes((byte,)) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte
        for byte in message.encode()
    )


def trailers_only(code: int, message: str) -> Headers:
    """A whole response in one HEADERS frame: HTTP 200, application/grpc, the status."""
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % code),
        (b"grpc-message", encode_message(message)),
    ]
