"""Logging: text or one JSON object per line, written by a thread so that a slow stderr
never blocks the event loop; the model server's lines are tagged as its own."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import queue
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_BUILTIN = frozenset(vars(logging.makeLogRecord({})))
# proxy.log_level's names
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class JsonFormatter(logging.Formatter):
    """`model`: config.yaml's model_name, a field of every line (a label to select by)."""

    def __init__(self, model: str | None = None) -> None:
        super().__init__()
        self._model = model

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "preformatted", False):
            return record.getMessage()
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._model is not None:
            entry["model"] = self._model
        entry.update((k, v) for k, v in vars(record).items() if k not in _BUILTIN)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """ISO 8601 in local time with its offset (2026-11-30T12:00:00.123+01:00): a line
        read from another machine or zone still says when it happened."""
        local = time.localtime(record.created)
        offset = abs(local.tm_gmtoff) // 60
        sign = "-" if local.tm_gmtoff < 0 else "+"
        return time.strftime("%Y-%m-%dT%H:%M:%S", local) + (
            f".{int(record.msecs):03d}{sign}{offset // 60:02d}:{offset % 60:02d}"
        )

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "preformatted", False):
            return record.getMessage()
        if record.name == "model_server":
            # the model server's own line, kept as it is behind a tag
            return f"[model-server {getattr(record, 'stream', '')}] {record.getMessage()}"
        return super().format(record)


class AccessLog:
    """Access lines kept on the event loop and handed to the log writer as one batch every
    `interval` seconds: a log record, a thread wake-up and a write per request cost more
    than proxying the request."""

    def __init__(self, log_format: str, model: str | None = None, interval: float = 0.1) -> None:
        self._formatter = JsonFormatter(model) if log_format == "json" else TextFormatter()
        self._interval = interval
        self._entries: list[tuple[float, str, tuple[object, ...], dict[str, object]]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, message: str, args: tuple[object, ...], fields: dict[str, object]) -> None:
        self._entries.append((time.time(), message, args, fields))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        entries, self._entries = self._entries, []
        if not entries:
            return
        lines = [
            self._formatter.format(
                logging.makeLogRecord(
                    {
                        "name": _access.name,
                        "levelno": logging.INFO,
                        "levelname": "INFO",
                        "msg": message,
                        "args": args,
                        "created": created,
                        "msecs": created % 1 * 1000,
                        **fields,
                    }
                )
            )
            for created, message, args, fields in entries
        ]
        _access.info("\n".join(lines), extra={"preformatted": True})


_proxy = logging.getLogger("model_proxy")
_access = logging.getLogger("model_proxy.access")


@contextmanager
def configured(
    log_format: str, level: int = logging.INFO, model: str | None = None
) -> Iterator[None]:
    """Route every log record through a queue to a writer thread for the duration. `level`
    is the proxy's own messages'; access lines have their own switch (access_log) and the
    model server's lines are its own business, as nginx's error_log level leaves them be."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(model) if log_format == "json" else TextFormatter())
    listener = logging.handlers.QueueListener(records, handler)
    root = logging.getLogger()
    queue_handler = logging.handlers.QueueHandler(records)
    root.addHandler(queue_handler)
    levels = {root: logging.INFO, _proxy: level, _access: logging.INFO}
    previous = {logger: logger.level for logger in levels}
    for logger, chosen in levels.items():
        logger.setLevel(chosen)
    listener.start()
    try:
        yield
    finally:
        listener.stop()
        root.removeHandler(queue_handler)
        for logger, before in previous.items():
            logger.setLevel(before)
