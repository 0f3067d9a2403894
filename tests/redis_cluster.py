"""A real Redis Cluster for tests (conftest.py's `redis_cluster` fixture): three `redis-server
--cluster-enabled yes` primaries on free loopback ports, each in its own directory, joined with
`redis-cli --cluster create` (the 16384 slots split in three), and torn down at the end. Three primaries
and no replicas: enough that the keys of different scopes live on different nodes, so a client that
does not follow MOVED fails, and cheap (about half a second to start).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.support import free_port

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
MISSING = ("the `redis-server` binary is not on PATH (Debian: apt-get install redis-server, which brings "
           "redis-cli; .ci/run installs it)") if REDIS_SERVER is None or REDIS_CLI is None else ""
"""Why cluster tests skip, or '' when they can run."""


@dataclass(frozen=True)
class Cluster:
    ports: tuple[int, ...]

    @property
    def url(self) -> str:
        """The first node's URL: a cluster client finds the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of one node, for looking at what it holds."""
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)

    def ask(self, port: int, *command: str) -> Any:
        """One command to one node, on a connection of its own."""
        with self.node(port) as r:
            return r.execute_command(*command)

    def owner(self, key: str) -> int:
        """The port of the node that serves `key`'s slot (asked of the cluster, not computed here)."""
        slot = int(self.ask(self.ports[0], "CLUSTER", "KEYSLOT", key))
        for start, end, (_, port, *_), *_ in self.ask(self.ports[0], "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(port)
        raise AssertionError(f"slot {slot} is not served")


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis cluster: {what} within {timeout} s")
        time.sleep(0.02)


@contextmanager
def running_cluster(directory: Path, nodes: int = 3) -> Iterator[Cluster]:
    """Start `nodes` primaries in `directory`, join them, wait for `cluster_state:ok` on each; stop them
    all on exit, whatever happened."""
    assert REDIS_SERVER and REDIS_CLI, MISSING
    ports = tuple(free_port() for _ in range(nodes))
    cluster = Cluster(ports)
    with ExitStack() as stack:
        for port in ports:
            home = directory / str(port)
            home.mkdir()
            proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 # the bus port too is a free one (the default, port + 10000, may be taken or past 65535)
                 "--cluster-port", str(free_port()), "--cluster-config-file", "nodes.conf",
                 "--save", "", "--appendonly", "no", "--dir", str(home)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stack.callback(stop, proc)
        for port in ports:
            wait_for(lambda p=port: cluster.ask(p, "PING") is True, f"node {port} did not answer PING")
        subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        for port in ports:
            wait_for(lambda p=port: cluster.ask(p, "CLUSTER INFO")["cluster_state"] == "ok",
                     f"node {port} did not reach cluster_state:ok")
        yield cluster


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
