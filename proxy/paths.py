"""Maps the proxy's routes onto the model server's paths, normalised so that no request
target can point the proxy anywhere but the model server's own origin."""

from __future__ import annotations

import re
from typing import Any

import httptools

_SLASHES = re.compile(rb"/{2,}")
_DOT = {b".", b"%2e"}
_DOTDOT = {b"..", b".%2e", b"%2e.", b"%2e%2e"}


def split_target(target: bytes) -> tuple[bytes, bytes] | None:
    """(path, query) of an origin-form or absolute-form request target; the query keeps
    its "?" and every byte. None for targets that are neither (`*`, authority-form)."""
    if target.startswith(b"/"):
        path, sep, query = target.partition(b"?")
        return path, sep + query
    if b"://" in target:
        # absolute-form: only the path and query count; the host is never used
        try:
            # Any: httptools' stub says bytes, but a part the URL lacks is None
            url: Any = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            return None
        url_path: bytes | None = url.path
        url_query: bytes | None = url.query
        return url_path or b"/", b"" if url_query is None else b"?" + url_query
    return None


def normalise(path: bytes) -> bytes:
    """Merge repeated slashes and resolve `.` and `..` segments (plain or percent-encoded),
    as nginx does before routing; the result always starts with exactly one "/"."""
    segments: list[bytes] = []
    parts = _SLASHES.sub(b"/", path).split(b"/")
    if not parts[0]:
        del parts[0]  # the leading "/"; a path without one loses no segment
    for segment in parts:
        lowered = segment.lower()
        if lowered in _DOT:
            continue
        if lowered in _DOTDOT:
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    trailing = b"/" if parts and parts[-1].lower() in _DOT | _DOTDOT and segments else b""
    return b"/" + b"/".join(segments) + trailing


class RouteMap:
    """`/predict` → the configured predict endpoint, `/sync/<path>` → `/<path>`."""

    def __init__(self, predict_endpoint: str) -> None:
        path, sep, query = predict_endpoint.encode().partition(b"?")
        self._predict_path = path
        self._predict_query = query if sep else b""

    def upstream_target(self, path: bytes, query: bytes) -> tuple[str, bytes] | None:
        """(route name, the target to send to the model server), or None for a path the
        proxy does not forward."""
        if path == b"/predict":
            return "predict", self._predict_path + self._join_query(query)
        if path == b"/sync" or path.startswith(b"/sync/"):
            return "sync", normalise(path[5:] or b"/") + query
        return None

    def _join_query(self, query: bytes) -> bytes:
        if not self._predict_query:
            return query
        if not query or query == b"?":
            return b"?" + self._predict_query
        return b"?" + self._predict_query + b"&" + query[1:]
