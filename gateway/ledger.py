"""The usage ledger: one JSON record per finished request, written off the event loop.

A record is serialized and appended to an in-memory queue (a non-blocking append); a writer thread
wakes every FLUSH_INTERVAL seconds and writes whatever has accumulated in one write and one flush, to
a size-rotated file (rotated by the standard library's RotatingFileHandler) or to stdout. The disk is
touched only by that thread. Batching matters: a thread woken, and a file flushed, for every record
contends for the GIL with the event loop on each request (measured: ~15 % of throughput on small
requests; see tests/perf/test_metering_overhead.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import logging.handlers
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gateway.settings import Ledger

log = logging.getLogger("gateway.ledger")


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
    rejected_by: str | None = None
    """The limit or budget that refused the request (`key:requests/minute`, `tenant:budget/month`)."""
    chunks: int | None = None
    """A long upload split into this many chunks, billed once (gateway/handlers/long_audio.py); null: sent whole."""
    item: str | None = None
    """A realtime session's item (`item_...`), billed on its own record; `request_id` is the session's."""


_FIELDS = tuple(f.name for f in dataclasses.fields(UsageRecord))


class LedgerWriter:
    FLUSH_INTERVAL = 0.1
    """Seconds between two writes of the accumulated records (also the most a record waits)."""

    def __init__(self, config: Ledger, stream: TextIO | None = None) -> None:
        """`stream`: write there instead of the configured sink, never rotated (a worker's channel to its
        parent, gateway/supervisor.py, whose own writer has the sink)."""
        self._stream = stream
        self._lines: collections.deque[str] = collections.deque()  # append/popleft are thread-safe
        self._file: logging.handlers.RotatingFileHandler | None = None
        self._max_bytes = config.max_bytes if config.backups > 0 else 0  # no backups: never rotate
        self._size = 0
        if config.sink == "file" and stream is None:
            path = Path(config.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = logging.handlers.RotatingFileHandler(path, maxBytes=config.max_bytes,
                                                              backupCount=config.backups, encoding="utf-8")
            self._size = path.stat().st_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
        self._thread.start()

    def write(self, record: UsageRecord) -> None:
        # The fields are all scalars: a plain dict, not dataclasses.asdict's recursive deep copy. ASCII
        # only (json.dumps' default), so a line's length in characters is its length in bytes.
        self._lines.append(json.dumps({f: getattr(record, f) for f in _FIELDS}, separators=(",", ":")) + "\n")

    def write_line(self, line: str) -> None:
        """One record already serialized by a worker, ending in a newline."""
        self._lines.append(line)

    def _run(self) -> None:
        while not self._stop.wait(self.FLUSH_INTERVAL):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        batch: list[str] = []
        try:
            while self._lines:
                line = self._lines.popleft()
                if self._file is not None and self._max_bytes and self._size and \
                        self._size + len(line) > self._max_bytes:
                    self._flush(batch)  # the file is full: what came before goes in it, then rotate
                    self._file.doRollover()
                    self._size = 0
                self._size += len(line)
                batch.append(line)
            self._flush(batch)
        except Exception:
            log.exception("writing the usage ledger failed; %d records dropped", len(batch))
            batch.clear()

    def _flush(self, batch: list[str]) -> None:
        if not batch:
            return
        stream = self._file.stream if self._file is not None else self._stream or sys.stdout
        stream.write("".join(batch))
        stream.flush()
        batch.clear()

    def close(self) -> None:
        """Write every record still queued and stop the writer thread."""
        self._stop.set()
        self._thread.join()
        if self._file is not None:
            self._file.close()
        if self._stream is not None:
            with contextlib.suppress(OSError):  # a parent already gone: what is left cannot be sent anyway
                self._stream.close()
