"""Reading one mapping of config.yaml: typed getters that record each problem with its
dotted path, and the `(got X)` rendering of a wrong value."""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Collection, Mapping
from typing import Any, TypeGuard, TypeVar

_SHOW_MAX = 80  # a `(got X)` longer than this is cut: the line must stay readable
_T = TypeVar("_T", bound=str)


def show(value: object) -> str:
    """`value` as YAML-ish text for `(got X)`: strings quoted, null/true/false as YAML has them."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):  # e.g. a YAML mapping with a list as key
        text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


def is_number(value: object) -> TypeGuard[int | float]:
    # YAML's true/false are bools, which Python counts as ints: they are not numbers here
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def endpoint_problem(value: object, *, query: bool) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if value != value.strip():
        return "must not have surrounding spaces"
    if not value.startswith("/"):
        return 'must start with "/"'
    if value.startswith("//"):  # a URL joiner would read it as another host
        return 'must not start with "//"'
    if any(char.isspace() or not char.isprintable() for char in value):
        return "must not contain spaces or control characters"
    if not value.isascii():
        return "must be ASCII (percent-encode other characters)"
    if "#" in value:
        return 'must not contain "#"'
    if "?" in value and not query:
        return "must not contain a query string"
    return None


class Section:
    """One mapping of config.yaml, read through typed getters that record problems instead of
    raising. A getter returns the default when the key is absent or null, and a placeholder
    when the value is wrong (the config is never built then)."""

    def __init__(
        self, raw: object, path: str, problems: list[str], known: Collection[str] | None = None
    ) -> None:
        self.path = path
        self.problems = problems
        self.data: Mapping[Any, Any] = raw if isinstance(raw, Mapping) else {}
        self.valid = raw is None or isinstance(raw, Mapping)
        if not self.valid:
            problems.append(f"{path}: must be a mapping (got {show(raw)})")
        for key, value in self.data.items():
            if known is not None and key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = (
                    f"did you mean {close[0]}?" if close else f"expected one of {', '.join(known)}"
                )
                self.fail(key, f"unknown key; {hint}", value)

    def child(self, key: str, *, known: Collection[str] | None = None) -> Section:
        return Section(self.data.get(key), self._where(key), self.problems, known)

    def fail(self, key: object, what: str, value: object) -> None:
        self.problems.append(f"{self._where(key)}: {what} (got {show(value)})")

    def text(self, key: str, *, required: bool = False, nonempty: bool = False) -> str:
        value = self.data.get(key)
        if value is None:
            self._require(key, required)
            return ""
        if not isinstance(value, str) or (nonempty and not value.strip()):
            self.fail(key, "must be a non-empty string" if nonempty else "must be a string", value)
            return ""
        return value

    def integer(self, key: str, default: int | None, *, low: int, high: int | None = None) -> int:
        """`default` None: the key is required."""
        value = self.data.get(key)
        if value is None:
            self._require(key, default is None)
            return default or 0
        # a float, even 8000.0, is a mistake worth pointing out rather than silently truncating
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if is_int and low <= value and (high is None or value <= high):
            return int(value)
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        self.fail(key, f"must be an integer {bounds}", value)
        return 0  # never a valid port, so no follow-on "must differ" problem

    def seconds(self, key: str, default: float) -> float:
        value = self.data.get(key)
        if value is None:
            return default
        if is_number(value) and value >= 0:
            return float(value)
        self.fail(key, "must be a number of seconds >= 0", value)
        return default

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        self.fail(key, "must be true or false", value)
        return default

    def positive(self, key: str, default: float) -> float:
        """Seconds that must be more than 0 (a limit of 0 would refuse everything)."""
        value = self.data.get(key)
        if value is None:
            return default
        if is_number(value) and value > 0:
            return float(value)
        self.fail(key, "must be a number of seconds > 0", value)
        return default

    def timeout(self, key: str, default: float | None = None) -> float | None:
        """Seconds > 0, or null for no limit; `default` when the key is absent."""
        if key not in self.data:
            return default
        value = self.data[key]
        if value is None:
            return None
        if is_number(value) and value > 0:
            return float(value)
        self.fail(key, "must be a number of seconds > 0, or null for no limit", value)
        return default

    def choice(self, key: str, options: tuple[_T, ...], default: _T) -> _T:
        value = self.data.get(key)
        for option in options:
            if value == option:
                return option
        if value is not None:
            self.fail(key, f"must be one of {', '.join(options)}", value)
        return default

    def endpoint(self, key: str, *, required: bool = False, query: bool = False) -> str:
        """A path on the model server; "" when absent or wrong."""
        value = self.data.get(key)
        if value is None:
            self._require(key, required)
            return ""
        if problem := endpoint_problem(value, query=query):
            self.fail(key, problem, value)
            return ""
        return str(value)

    def _require(self, key: str, required: bool) -> None:
        # a section that is not a mapping was reported once already
        if required and self.valid:
            self.problems.append(f"{self._where(key)}: required")

    def _where(self, key: object) -> str:
        return f"{self.path}.{key}" if self.path else str(key)
