"""The log writer (gateway/logs.py): records are written to stderr by a listener thread, never by the event loop.

A gateway whose stderr nobody reads (a stuck log collector: a pipe fills at 64 KiB, here at 4 KiB) keeps answering;
the access-log lines it queued meanwhile are all written once the pipe is read again.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx

from gateway.logs import LOG_QUEUE, queued_logging
from tests.conftest import LOOPBACK_TLS, engine_config
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import free_port, wait_for

PIPE_BYTES = 4096


class ThreadRecordingStream(io.StringIO):
    """A stream that remembers which thread wrote each line."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: list[str] = []

    def write(self, text: str) -> int:
        self.writers.append(threading.current_thread().name)
        return super().write(text)


def test_records_are_written_by_the_listener_thread_not_the_caller() -> None:
    stream = ThreadRecordingStream()
    with queued_logging(stream=stream) as listener:
        logging.getLogger("gateway.access").info(json.dumps({"status": 200}))
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("gateway").exception("unhandled error in request %s", "req_1")
    assert listener._thread is None  # stopped with the block
    lines = stream.getvalue().splitlines()
    assert lines[0] == '{"status": 200}'
    assert lines[1] == "unhandled error in request req_1"
    assert "Traceback" in stream.getvalue() and "ValueError: boom" in stream.getvalue()  # still logged whole
    assert stream.writers and threading.current_thread().name not in stream.writers
    assert logging.getLogger().handlers != [] and not any(
        type(h).__name__ == "DroppingQueueHandler" for h in logging.getLogger().handlers)


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    stuck = threading.Event()

    class Stuck(ThreadRecordingStream):
        def write(self, text: str) -> int:
            stuck.wait(10)
            return super().write(text)

    stream = Stuck()
    with queued_logging(stream=stream) as listener:
        started = time.monotonic()
        for i in range(LOG_QUEUE + 500):
            logging.getLogger("gateway.access").info("line %d", i)
        assert time.monotonic() - started < 5, "logging blocked on a stuck writer"
        stuck.set()
        wait_for(listener.queue.empty, timeout=10, what="the writer to catch up")
        logging.getLogger("gateway").info("after")
    lines = stream.getvalue().splitlines()
    assert lines[-2:] == ["499 log records dropped: stderr was not read", "after"], lines[-3:]
    assert lines[0] == "line 0" and len(lines) == LOG_QUEUE + 3  # the queue, the one the writer held, note, after


def test_a_gateway_whose_stderr_is_not_read_keeps_answering(engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    config = tmp_path / "gateway.yaml"
    config.write_text(engine_config(engine.url, spool).replace(
        "server:\n", "server:\n  probe_interval_s: 0\n  drain_delay_s: 0\n", 1))  # SIGTERM: exit at once
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    assert proc.stdout is not None
    fcntl.fcntl(proc.stdout, fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # Linux's smallest pipe: full after ~27 lines
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1, verify=LOOPBACK_TLS)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "gateway did not start"
                time.sleep(0.05)
        requests = 300  # ~150 bytes of access log each: ten times what the pipe buffers
        slowest = 0.0
        with httpx.Client(verify=LOOPBACK_TLS, timeout=5) as client:
            for _ in range(requests):
                started = time.monotonic()
                assert client.get(f"{url}/healthz").status_code == 200
                slowest = max(slowest, time.monotonic() - started)
        assert slowest < 1.0, f"a request took {slowest:.2f} s with stderr unread"
        proc.terminate()
        out, _ = proc.communicate(timeout=30)  # now read: the listener writes what it queued
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    access = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    assert sum(1 for r in access if r["endpoint"] == "/healthz") >= requests
    assert b"log records dropped" not in out
