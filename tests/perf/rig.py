"""What the benchmarks run: the gateway's config, and the backend, nginx, the gateway and wrk, each pinned
to a core, and the CPU time of a process tree read from /proc.

The proxy under test (nginx or the gateway) gets PROXY_CORES, the backend and the load generator get
LOAD_CORES, so the proxy's CPU time is its own and the figure "requests per proxy CPU-second" does not
depend on how fast the other core keeps it fed. On a machine with one CPU nothing is pinned.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import DEMO_KEY, sha
from tests.perf.perfkit import median
from tests.support import free_port

ROOT = Path(__file__).parent.parent.parent
PINNED = (os.cpu_count() or 1) >= 2
PROXY_CORES = {0} if PINNED else None
LOAD_CORES = {1} if PINNED else None


def _pin(cores: set[int] | None) -> Callable[[], None] | None:
    return None if cores is None else lambda: os.sched_setaffinity(0, cores)


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime (and the same of reaped children) of `pid` and of every live descendant, in seconds."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on; comm may hold spaces
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, path: str, proc: subprocess.Popen[bytes], log: Path | None = None, timeout: float = 30) -> None:
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode}: {log.read_text() if log else ''}")
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{proc.args} did not answer {path}: {log.read_text() if log else ''}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextmanager
def backend(speech: Path, chunk: int, hold_ms: float = 0) -> Iterator[tuple[str, int]]:
    """tests/perf/backend.py on LOAD_CORES, each speech answer held `hold_ms` before its first byte; yields its
    base URL and pid."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.perf.backend", str(speech), "--chunk", str(chunk),
                             "--hold-ms", f"{hold_ms:g}"],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=_pin(LOAD_CORES))
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        assert url.startswith("http://"), "the backend did not start"
        yield url, proc.pid
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        stop(proc)


@contextmanager
def redis(workdir: Path) -> Iterator[tuple[str, int] | None]:
    """A throwaway redis-server (no persistence, data dir `workdir`) on a free loopback port, on LOAD_CORES;
    yields its URL and pid, or None when the binary is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_pin(LOAD_CORES))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("redis-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        stop(proc)


GATEWAY_YAML = """
server:
  spool_dir: {spool}
  drain_delay_s: 0
  grace_s: 5
keys:
  - {{name: bench, tenant: bench, sha256: "{sha}"}}
backends:
  engine: {{kind: openai, url: "{backend}", api_key: "bench-engine-key"}}
models:
  tts-1: {{task: speech, routes: [{{backend: engine, model: kokoro}}]{price}}}
  whisper-1: {{task: transcription, routes: [{{backend: engine, model: whisper}}]}}
voices:
  nova: {{engine: af_nova}}
"""


def gateway_yaml(spool: Path, backend_url: str, tts_price: str = "") -> str:
    """The benchmarks' gateway: the shipped defaults (metrics on, ledger off, spool_memory_bytes,
    audio_workers) with one backend, the demo key, tts-1 priced as `tts_price` says (e.g.
    "per_million_characters: 15"); no drain delay, so that each gateway stops at once."""
    price = f", price: {{{tts_price}}}" if tts_price else ""
    return GATEWAY_YAML.format(spool=spool, sha=sha(DEMO_KEY), backend=backend_url, price=price)


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream backend {{ server {backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        client_max_body_size 26m;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""
"""Pass-through as in deploy/kubernetes/ingress.yaml: no buffering either way, keep-alive to the backend."""


@contextmanager
def nginx(backend_url: str, port: int, workdir: Path) -> Iterator[tuple[str, int] | None]:
    """nginx (one worker) on PROXY_CORES in front of `backend_url`; yields its base URL and master pid,
    or None when nginx is not installed."""
    binary = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if binary is None:
        yield None
        return
    workdir.mkdir(parents=True, exist_ok=True)
    hostport = backend_url.split("//", 1)[1].split("/", 1)[0]
    (workdir / "nginx.conf").write_text(NGINX_CONF.format(dir=workdir, backend=hostport, port=port))
    proc = subprocess.Popen([binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
                            stderr=subprocess.DEVNULL, preexec_fn=_pin(PROXY_CORES))
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_http(url, "/v1/models", proc, workdir / "error.log")
        yield url, proc.pid
    finally:
        stop(proc, signal.SIGQUIT)


@contextmanager
def gateway(config: Path, port: int, log: Path, loop: str = "auto", workers: int | None = None,
            cores: set[int] | None = PROXY_CORES) -> Iterator[tuple[str, int]]:
    """`gateway serve` on `cores` (GATEWAY_EVENT_LOOP=`loop`); yields its base URL and pid."""
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
    if workers is not None:
        args += ["--workers", str(workers)]
    with log.open("ab") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_pin(cores),
                                env={**os.environ, "GATEWAY_EVENT_LOOP": loop})
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_http(url, "/readyz", proc, log)
        yield url, proc.pid
    finally:
        stop(proc, timeout=30)


def serve_has_workers() -> bool:
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    return "--workers" in done.stdout


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "{content_type}"
{auth}
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{{"requests": %d, "us": %d, "bytes": %d, "status": %d, "socket": %d, '
    .. '"p50": %d, "p99": %d}}\\n', summary.requests, summary.duration, summary.bytes, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class Load:
    requests: int
    seconds: float
    bytes: int
    errors: int
    """Non-2xx answers plus socket errors (connect, read, write, timeout)."""
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


@dataclass
class Measured:
    """One configuration's wrk runs and CPU time, as the overhead benchmarks report them."""

    name: str
    url: str
    pid: int | None
    """The gateway's pid; None: the backend called directly."""
    store_pid: int | None = None
    """redis-server's pid, whose CPU is counted apart."""
    wide: list[Load] = field(default_factory=list)
    """The runs at many connections."""
    single: list[Load] = field(default_factory=list)
    """The runs at 1 connection."""
    cpu: list[float] = field(default_factory=list)
    """Gateway CPU seconds of each wide run."""
    store_cpu: list[float] = field(default_factory=list)

    @property
    def loads(self) -> list[Load]:
        return self.wide + self.single

    @property
    def rps(self) -> float:
        return sum(load.requests for load in self.wide) / sum(load.seconds for load in self.wide)

    @property
    def cpu_us(self) -> float:
        return sum(self.cpu) / sum(load.requests for load in self.wide) * 1e6 if self.cpu else float("nan")

    @property
    def store_cpu_us(self) -> float:
        return sum(self.store_cpu) / sum(load.requests for load in self.wide) * 1e6 if self.store_cpu \
            else float("nan")

    @property
    def p50_ms(self) -> float:
        return median([load.p50_ms for load in self.single])

    @property
    def p99_ms(self) -> float:
        return median([load.p99_ms for load in self.single])

    @property
    def wide_p99_ms(self) -> float:
        return median([load.p99_ms for load in self.wide])

    def run_wide(self, script: Path, connections: int, seconds: float, path: str = "/audio/speech") -> Load:
        """A 1 s warm-up (connections, pools, the store's connections and pages), then `seconds` of wrk at
        `connections`, with the gateway's and the store's CPU time over it; returns the warm-up's Load."""
        url = self.url + path
        warm = wrk(url, script, connections, 1)
        before = tree_cpu_seconds(self.pid) if self.pid else 0.0
        store_before = tree_cpu_seconds(self.store_pid) if self.store_pid else 0.0
        self.wide.append(wrk(url, script, connections, seconds))
        if self.pid:
            self.cpu.append(tree_cpu_seconds(self.pid) - before)
        if self.store_pid:
            self.store_cpu.append(tree_cpu_seconds(self.store_pid) - store_before)
        return warm

    def run_single(self, script: Path, seconds: float, path: str = "/audio/speech") -> Load:
        """A 1 s warm-up, then `seconds` of wrk at one connection; returns the warm-up's Load."""
        warm = wrk(self.url + path, script, 1, 1)
        self.single.append(wrk(self.url + path, script, 1, seconds))
        return warm


def wrk_script(path: Path, body: Path, content_type: str, key: str | None) -> Path:
    auth = "" if key is None else f'wrk.headers["Authorization"] = "Bearer {key}"'
    path.write_text(WRK_SCRIPT.format(content_type=content_type, auth=auth, body=body))
    return path


def wrk(url: str, script: Path, connections: int, seconds: float, cores: set[int] | None = LOAD_CORES) -> Load:
    """`wrk` with one thread: `connections` keep-alive connections for `seconds`."""
    done = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(script),
                           url], capture_output=True, text=True, timeout=seconds + 60, preexec_fn=_pin(cores))
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith('{"requests"'))
    r = json.loads(line)
    return Load(r["requests"], r["us"] / 1e6, r["bytes"], r["status"] + r["socket"], r["p50"] / 1000, r["p99"] / 1000)
