"""The model server's own Prometheus metrics in the proxy's scrape: fetched when /metrics is
scraped (one fetch at a time, shared by the scrapes that arrive meanwhile, 2 s at most),
checked with prometheus-client's parser, and appended unchanged but for the families whose
names the proxy uses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("model_proxy")

FETCH_TIMEOUT = 2.0  # seconds, from the scrape's arrival: Prometheus' own default is 10 s
MAX_BYTES = 32 * 1024 * 1024
# the classic text format (what the proxy itself answers), not OpenMetrics
ACCEPT = "text/plain;version=0.0.4;q=1.0,*/*;q=0.1"
# the sample names a family of name N may use, besides N
_SUFFIXES = ("_total", "_created", "_bucket", "_sum", "_count", "_gsum", "_gcount", "_info")


class Unavailable(Exception):
    """The model server's metrics cannot be merged into this scrape."""


class UpstreamMetrics:
    """Fetches `url` for a scrape; `reserved` are the metric names the proxy exposes."""

    def __init__(
        self, url: str, *, reserved: frozenset[str], timeout: float = FETCH_TIMEOUT
    ) -> None:
        self.url = url
        self._reserved = reserved
        self._timeout = timeout
        self._in_flight: asyncio.Task[bytes | None] | None = None
        self._failing: str | None = None  # what went wrong last time, said once

    async def families(self) -> bytes | None:
        """The model server's families to append to the proxy's, or None when they could
        not be had within the timeout. A fetch already under way is shared, not repeated."""
        task = self._in_flight
        if task is None:
            task = self._in_flight = asyncio.ensure_future(self._fetch())
            task.add_done_callback(self._fetched)
        # a scrape that leaves does not cancel the fetch the others wait for
        return await asyncio.shield(task)

    def _fetched(self, task: asyncio.Task[bytes | None]) -> None:
        if self._in_flight is task:
            self._in_flight = None

    async def _fetch(self) -> bytes | None:
        try:
            async with asyncio.timeout(self._timeout):
                text = await self._get()
                # parsing a large exposition takes milliseconds: not on the event loop
                merged = await asyncio.to_thread(child_families, text, self._reserved)
        except TimeoutError:
            self._failed(f"no answer within {self._timeout:g} s")
            return None
        except OSError as exc:
            self._failed(f"cannot fetch them ({exc or type(exc).__name__})")
            return None
        except (Unavailable, ValueError) as exc:
            self._failed(str(exc))
            return None
        if self._failing is not None:
            log.info("the model server's metrics at %s are merged again", self.url)
            self._failing = None
        return merged

    def _failed(self, why: str) -> None:
        if why != self._failing:
            log.warning("the model server's metrics at %s are not merged: %s", self.url, why)
            self._failing = why
        return None

    async def _get(self) -> str:
        # imported here: only a proxy that merges a model server's metrics pays its memory
        import aiohttp

        connector = aiohttp.TCPConnector(force_close=True)
        try:
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.get(self.url, headers={"Accept": ACCEPT}, allow_redirects=False) as answer,
            ):
                if answer.status != 200:
                    raise Unavailable(f"status {answer.status}")
                body = bytearray()
                async for data in answer.content.iter_chunked(65536):
                    body += data
                    if len(body) > MAX_BYTES:
                        raise Unavailable(f"more than {MAX_BYTES} bytes")
                openmetrics = answer.content_type == "application/openmetrics-text"
        except aiohttp.ClientError as exc:
            raise Unavailable(f"cannot fetch them ({exc or type(exc).__name__})") from exc
        text = body.decode("utf-8")  # a UnicodeDecodeError is a ValueError
        return _as_text_format(text) if openmetrics else text


def exposed_names(exposition: str) -> frozenset[str]:
    """Every metric name an exposition uses: its families' (with and without `_total`) and
    its samples'."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                names.update((parts[2], parts[2].removesuffix("_total")))
        elif line.strip():
            names.add(_sample_name(line))
    return frozenset(names)


def child_families(text: str, reserved: frozenset[str]) -> bytes:
    """The model server's exposition `text` as lines to append: families that use a name in
    `reserved` dropped, the others unchanged. ValueError if the parser rejects `text`: a
    malformed line would make Prometheus reject the proxy's own metrics with it."""
    # the parsers are imported when a model server's metrics are first merged, not before
    from prometheus_client.parser import text_string_to_metric_families

    for _ in text_string_to_metric_families(text):
        pass  # parsed to the end, or ValueError
    kept: list[str] = []
    for names, lines in _families(text.splitlines()):
        if names.isdisjoint(reserved):
            kept += lines
    return "".join(line + "\n" for line in kept).encode()


def _families(lines: Iterable[str]) -> Iterator[tuple[set[str], list[str]]]:
    """The exposition's lines by family: the names it uses, and its lines."""
    family: str | None = None
    names: set[str] = set()
    block: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        sample = None
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                block.append(line)  # a plain comment stays with the family it is in
                continue
            name = parts[2]
        else:
            sample = _sample_name(line)
            name = family if family is not None and _of_family(sample, family) else sample
        if name != family:
            if block:
                yield names, block
            family, names, block = name, {name, name.removesuffix("_total")}, []
        if sample is not None:
            names.add(sample)
        block.append(line)
    if block:
        yield names, block


def _of_family(sample: str, family: str) -> bool:
    return sample == family or (sample.startswith(family) and sample[len(family) :] in _SUFFIXES)


def _sample_name(line: str) -> str:
    end = len(line)
    for stop in ("{", " ", "\t"):
        at = line.find(stop)
        if at != -1:
            end = min(end, at)
    return line[:end]


class _Parsed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def _as_text_format(openmetrics: str) -> str:
    """An OpenMetrics answer (the model server ignored the Accept header) in the text
    format, through prometheus-client's parser and exposition."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    families = list(text_string_to_metric_families(openmetrics))  # type: ignore[no-untyped-call]
    return generate_latest(_Parsed(families)).decode()
