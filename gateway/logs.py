"""The process's logging: records are queued on the event loop and written to stderr by one listener thread.

A write to stderr blocks when its pipe is full (a slow or stuck log collector), and a blocked write on
the event loop stalls every request. So handlers only enqueue (QueueHandler) and a QueueListener thread
does the writing. The queue is bounded (LOG_QUEUE records): past it records are dropped and counted,
and the count is logged once there is room again, so a stuck collector costs log lines, not latency
or memory.
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging.handlers import QueueHandler, QueueListener
from typing import TextIO

LOG_QUEUE = 10_000
"""Records waiting for the writer thread at most (about 3 MB of access-log lines)."""


class DroppingQueueHandler(QueueHandler):
    """Enqueues without ever waiting; a record that finds the queue full is dropped and counted."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                note = logging.makeLogRecord({"name": "gateway.logs", "levelno": logging.WARNING,
                                              "levelname": "WARNING",
                                              "msg": f"{self.dropped} log records dropped: stderr was not read"})
                self.queue.put_nowait(note)
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


@contextmanager
def queued_logging(level: int = logging.INFO, stream: TextIO | None = None) -> Iterator[QueueListener]:
    """Route the root logger through a bounded queue to a writer thread on `stream` (stderr), for the
    life of the block; the listener flushes what is queued when the block ends."""
    records: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE)
    writer = logging.StreamHandler(stream or sys.stderr)
    writer.setFormatter(logging.Formatter("%(message)s"))
    listener = QueueListener(records, writer, respect_handler_level=False)
    root = logging.getLogger()
    handler = DroppingQueueHandler(records)
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(level)
    listener.start()
    try:
        yield listener
    finally:
        root.handlers[:], root.level = saved
        _stop(listener)


def _stop(listener: QueueListener, timeout: float = 5.0) -> None:
    """Let the writer flush what is queued, for at most `timeout`: a writer stuck on a full stderr must not
    keep the process from exiting (the listener's thread is a daemon). QueueListener.stop() could wait for
    ever; `_sentinel` and `_thread` are its end marker and its writer thread (CPython's, since 3.2)."""
    deadline = time.monotonic() + timeout
    try:
        listener.queue.put(listener._sentinel, timeout=timeout)  # type: ignore[attr-defined]
    except queue.Full:
        return
    thread = listener._thread  # type: ignore[attr-defined]
    if thread is not None:
        thread.join(max(0.0, deadline - time.monotonic()))
    listener._thread = None  # type: ignore[attr-defined]
