"""A real Redis Cluster for tests (conftest.py's `redis_cluster` fixture): three `redis-server
--cluster-enabled yes` primaries on free loopback ports, each in its own directory, joined with
`redis-cli --cluster create --cluster-replicas 0` (the 16384 slots split in three), and torn down at the
end. Three primaries: enough that the keys of different scopes live on different nodes, so a client that
does not follow MOVED fails. About 2 s to start, nearly all of it redis-cli's own waits for the join.
A fourth node waits aside for `Cluster.failed_over`, which makes it a replica and promotes it (it stays a
replica afterwards; clients that read from primaries only never use it).
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


def start_node(home: Path, port: int) -> subprocess.Popen[bytes]:
    home.mkdir()
    return subprocess.Popen(
        [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         # the bus port too is a free one (the default, port + 10000, may be taken or past 65535)
         "--cluster-port", str(free_port()), "--cluster-config-file", "nodes.conf",
         "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0", "--dir", str(home)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass(frozen=True)
class Cluster:
    ports: tuple[int, ...]
    """The primaries as created (a test's failover changes roles while it runs)."""
    spare: int
    """A node started with the others but not joined: `failed_over` makes it a replica and promotes it.
    Started early because a node that became a primary less than 2 s after it started keeps
    `cluster_state:fail` until then."""

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
        return self.server(self.ports[0], int(self.ask(self.ports[0], "CLUSTER", "KEYSLOT", key)))

    def server(self, port: int, slot: int) -> int:
        """The port of the primary serving `slot`, as node `port` sees it."""
        for start, end, (_, primary, *_), *_ in self.ask(port, "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(primary)
        raise AssertionError(f"slot {slot} is not served")

    def flags(self, port: int, about: int) -> str:
        """What node `port` thinks node `about` is: `master`, `slave`, `handshake`..., '' when unknown."""
        return next((line.split()[2] for line in self.ask(port, "CLUSTER", "NODES").splitlines()
                     if f":{about}@" in line), "")

    @contextmanager
    def failed_over(self, primary: int) -> Iterator[int]:
        """The spare node joins as a replica of `primary`, catches up and takes its slots over with
        `CLUSTER FAILOVER TAKEOVER` (what a failover does when the primary is lost); yields its port. On
        exit the primary takes them back, and the spare stays on as its replica (a client that does not
        read from replicas never uses it)."""
        port = self.spare
        for p in self.ports:  # each directly: gossip alone takes seconds to tell them all
            bus = next(line.split()[1].split("@")[1] for line in self.ask(p, "CLUSTER", "NODES").splitlines()
                       if "myself" in line)
            self.ask(port, "CLUSTER", "MEET", "127.0.0.1", str(p), bus)
        wait_for(lambda: all(self.flags(p, port) in ("master", "slave") for p in self.ports),
                 "not every node met the spare")
        self.ask(port, "CLUSTER", "REPLICATE", self.ask(primary, "CLUSTER", "MYID"))
        self.promote(port, primary)
        try:
            yield port
        finally:
            self.promote(primary, port)

    def promote(self, replica: int, primary: int) -> None:
        """Once `replica` has every write of `primary`, it takes over; returns when every node says so."""
        def synced() -> bool:
            theirs, mine = self.ask(primary, "INFO", "replication"), self.ask(replica, "INFO", "replication")
            return mine.get("master_link_status") == "up" and \
                mine["master_repl_offset"] == theirs["master_repl_offset"]

        slot = next(start for start, _, (_, port, *_), *_ in self.ask(primary, "CLUSTER", "SLOTS") if port == primary)
        wait_for(synced, f"{replica} did not catch up with {primary}")
        self.ask(replica, "CLUSTER", "FAILOVER", "TAKEOVER")

        def everyone_knows() -> bool:
            return self.ask(primary, "ROLE")[0] == "slave" and all(
                self.ask(p, "CLUSTER INFO")["cluster_state"] == "ok" and self.server(p, slot) == replica
                for p in {*self.ports, replica})

        wait_for(everyone_knows, f"not every node saw {replica} take over from {primary}")


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
    """Start `nodes` primaries and the spare in `directory`, join the primaries, wait for
    `cluster_state:ok` on each; stop them all on exit, whatever happened."""
    assert REDIS_SERVER and REDIS_CLI, MISSING
    ports = tuple(free_port() for _ in range(nodes))
    cluster = Cluster(ports, free_port())
    with ExitStack() as stack:
        for port in (*ports, cluster.spare):
            stack.callback(stop, start_node(directory / str(port), port))
        for port in (*ports, cluster.spare):
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
