"""A gateway in a process of its own (`python -m gateway serve [--workers N]`), for signal, shutdown and reload
tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

from tests.conftest import LOOPBACK_TLS
from tests.support import free_port


class GatewayProcess:
    def __init__(self, config_path: Path, log_path: Path, workers: int = 1) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.workers = workers
        self._log = open(log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if workers > 1:  # the parent's metrics directory goes there: gone with the test's tmp dir if left over
            env["TMPDIR"] = str(log_path.parent)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--port", str(self.port),
             "--workers", str(workers)],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent, env=env,
            start_new_session=workers > 1)  # its own process group: stop() ends the workers with it
        self.wait_ready()
        if workers > 1:
            self.wait_serving(workers)

    def serving(self) -> dict[int, int]:
        """worker slot -> pid of its latest process that told the parent it serves (from the parent's log)."""
        return {int(slot): int(pid) for slot, pid in re.findall(r"^worker (\d+) \(pid (\d+)\) serving$", self.log(),
                                                                 re.MULTILINE)}

    def wait_serving(self, count: int, timeout: float = 20) -> dict[int, int]:
        """The workers' pids once `count` processes have served (restarts included)."""
        deadline = time.monotonic() + timeout
        while (found := len(re.findall(r"^worker \d+ \(pid \d+\) serving$", self.log(), re.MULTILINE))) < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{found} worker processes served, expected {count}:\n{self.log()}")
            time.sleep(0.05)
        return self.serving()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1, verify=LOOPBACK_TLS).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"gateway did not start:\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.workers > 1:
            with contextlib.suppress(ProcessLookupError):  # the parent and any worker still running
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()
