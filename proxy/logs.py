"""Logging: text or one JSON object per line, written by a thread so that a slow stderr
never blocks the event loop; the model server's lines are tagged as its own."""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_BUILTIN = frozenset(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _BUILTIN)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "model_server":
            # the model server's own line, kept as it is behind a tag
            return f"[model-server {getattr(record, 'stream', '')}] {record.getMessage()}"
        return super().format(record)


@contextmanager
def configured(log_format: str, level: int = logging.INFO) -> Iterator[None]:
    """Route every log record through a queue to a writer thread for the duration."""
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    listener = logging.handlers.QueueListener(records, handler)
    root = logging.getLogger()
    queue_handler = logging.handlers.QueueHandler(records)
    root.addHandler(queue_handler)
    previous_level = root.level
    root.setLevel(level)
    listener.start()
    try:
        yield
    finally:
        listener.stop()
        root.removeHandler(queue_handler)
        root.setLevel(previous_level)
