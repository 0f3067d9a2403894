"""The usage ledger: one JSON record per finished request, written off the event loop.

Records go through a queue to a listener thread (the standard library's QueueHandler and
QueueListener), which writes them as JSON lines to a size-rotated file or to stdout. Writing a
record is a non-blocking put; the disk is touched only by the listener thread.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.config import Ledger


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    time: str
    """ISO 8601, UTC, when the request finished."""
    tenant: str | None
    key: str | None
    endpoint: str
    model: str | None
    backend: str | None
    native_model: str | None
    voice: str | None
    characters: int
    audio_seconds: float
    cost_usd: float | None
    status: int
    billable: bool
    completed: bool


class LedgerWriter:
    def __init__(self, config: Ledger) -> None:
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._logger = logging.Logger(f"gateway.ledger.{id(self)}")  # private: never propagates to root
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        target: logging.Handler
        if config.sink == "file":
            path = Path(config.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            target = logging.handlers.RotatingFileHandler(path, maxBytes=config.max_bytes,
                                                          backupCount=config.backups, encoding="utf-8")
        else:
            target = logging.StreamHandler(sys.stdout)
        target.setFormatter(logging.Formatter("%(message)s"))
        self._target = target
        self._listener = logging.handlers.QueueListener(self._queue, target)
        self._listener.start()

    def write(self, record: UsageRecord) -> None:
        self._logger.info(json.dumps(asdict(record), separators=(",", ":")))

    def close(self) -> None:
        """Flush every queued record and stop the listener thread."""
        self._listener.stop()
        self._target.close()
