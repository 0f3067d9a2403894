"""A real `redis-server` for the state store's tests (tests/test_store.py, tests/test_shared_state.py): on a
free loopback port with a temp dir, no persistence, skipped only when the binary is missing (.ci/run installs
it). It can be killed (SIGKILL, as a crash) and started again on the same port, for the failure policy.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support import free_port

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="the `redis-server` binary is not on PATH "
                                 "(Debian: apt-get install redis-server; .ci/run installs it)")


class RedisServer:
    def __init__(self, data_dir: Path) -> None:
        assert REDIS_SERVER is not None
        self.port = free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        """Start it (again) on its port and wait until it answers PING."""
        assert REDIS_SERVER is not None and (self.proc is None or self.proc.poll() is not None)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: connections drop, and what it held is gone (no persistence)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@contextmanager
def redis_server(data_dir: Path) -> Iterator[RedisServer]:
    """A running server for a fixture's lifetime; skips the test when there is no binary."""
    if REDIS_SERVER is None:
        pytest.skip("the `redis-server` binary is not on PATH")
    server = RedisServer(data_dir)
    try:
        yield server
    finally:
        server.stop()
