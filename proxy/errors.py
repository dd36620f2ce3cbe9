"""The proxy's own errors: one exception tree and, on each class, how it looks on the wire.

Exception
├── ConfigError          a bad config.yaml; carries every problem found
└── ProxyError           a request the proxy answers itself
    ├── BadRequest            400 bad_request
    │   └── RequestTimeout    408 request_timeout (the head or body stopped arriving)
    ├── Unauthorized          401 unauthorized
    ├── NotFound              404 not_found
    ├── MethodNotAllowed      405 method_not_allowed
    ├── PayloadTooLarge       413 payload_too_large
    ├── UriTooLong            414 uri_too_long
    ├── HeadersTooLarge       431 headers_too_large
    ├── UpstreamUnavailable   502 upstream_unavailable
    ├── NotReady              503 not_ready      (Retry-After)
    ├── Draining              503 draining       (Retry-After)
    ├── QueueFull             503 queue_full     (Retry-After)
    ├── QueueTimeout          503 queue_timeout  (Retry-After)
    └── UpstreamTimeout       504 upstream_timeout
"""

from __future__ import annotations

import json
from typing import ClassVar


class ConfigError(Exception):
    """A configuration that cannot run; `problems` holds one `dotted.path: what (got X)` each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ProxyError(Exception):
    """An error the proxy answers itself with the contract's JSON body."""

    status: ClassVar[int] = 500
    kind: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "internal error"
    retry_after: ClassVar[int | None] = None
    headers: ClassVar[tuple[tuple[bytes, bytes], ...]] = ()

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)
        self.message = message or self.default_message

    def body(self) -> bytes:
        return error_body(self.kind, self.message)


def error_body(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"type": kind, "message": message}}).encode()


class BadRequest(ProxyError):
    status, kind, default_message = 400, "bad_request", "malformed HTTP request"


class RequestTimeout(BadRequest):
    """A client too slow to send its request (slowloris): a bad request, answered 408."""

    status, kind, default_message = 408, "request_timeout", "timed out reading the request"


class Unauthorized(ProxyError):
    status, kind = 401, "unauthorized"
    default_message = "a valid API key is required: Authorization: Bearer <key> or Api-Key <key>"
    headers = ((b"WWW-Authenticate", b'Bearer realm="model-proxy"'),)


class NotFound(ProxyError):
    status, kind = 404, "not_found"
    default_message = "no such route: use /predict or /sync/<path>"


class MethodNotAllowed(ProxyError):
    status, kind, default_message = 405, "method_not_allowed", "only GET and HEAD are allowed"


class PayloadTooLarge(ProxyError):
    status, kind, default_message = 413, "payload_too_large", "request body too large"


class UriTooLong(ProxyError):
    status, kind, default_message = 414, "uri_too_long", "request line too long"


class HeadersTooLarge(ProxyError):
    status, kind, default_message = 431, "headers_too_large", "request headers too large"


class UpstreamUnavailable(ProxyError):
    status, kind, default_message = 502, "upstream_unavailable", "the model server is unreachable"


class NotReady(ProxyError):
    status, kind, retry_after = 503, "not_ready", 1
    default_message = "the model server is not ready"


class Draining(ProxyError):
    status, kind, retry_after = 503, "draining", 1
    default_message = "the proxy is shutting down"


class QueueFull(ProxyError):
    status, kind, retry_after = 503, "queue_full", 1
    default_message = "too many requests are waiting"


class QueueTimeout(ProxyError):
    status, kind, retry_after = 503, "queue_timeout", 1
    default_message = "timed out waiting for a free slot"


class UpstreamTimeout(ProxyError):
    status, kind, default_message = (
        504,
        "upstream_timeout",
        "the model server did not answer in time",
    )
