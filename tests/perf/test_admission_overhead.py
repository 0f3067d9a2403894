"""What admission control (`backends.<b>.max_concurrency`, gateway/capacity.py) costs per request: small
speech through the gateway with no limit, against the same with a limit too large ever to queue, its slots
counted in memory, on SQLite and on a real redis-server; the backend called directly for reference; and
two gateways whose limit does queue; in one run, against one backend (tests/perf/backend.py, a small PCM
body after a 5 ms wait, HOLD_MS: an engine's requests overlap, so there is a concurrency to limit).

Run: .venv/bin/python -m pytest tests/perf/test_admission_overhead.py -q -s -p no:cacheprovider
Needs `wrk`; the redis row needs `redis-server` (without it that row is skipped and said so).

With `max_concurrency: 10000` every request takes a slot at once and gives it back as its last byte goes
out: nothing on `memory` (a count in the process), two store round trips on `sqlite` and `redis` (`acquire`,
then `release` in the background), so the difference against the row without a limit is the admission
path's own cost. The queue rows have `max_concurrency: 4` under 32 connections, slots counted in memory
and on SQLite (the default store: a slot freed goes back to the store before the head of the queue can
lease it): the backend answers at most 4 / 5 ms = 800 a second there, 28 requests wait at any time, and
req/s, p99 at 32 connections and the queue wait histogram (gateway_backend_queue_wait_seconds, read from
/metrics) show what that does. At 1 connection nothing queues. A gateway spends more CPU on each request
when it serves fewer a second, so the gateway without a limit is also measured at 4 connections: the queue's
own cost is a queue row's CPU against that row's.

As tests/perf/test_policy_overhead.py: the gateways run side by side on core 0 (tests/perf/rig.py), the
backend, wrk and redis-server on core 1, and take turns, BENCH_ROUNDS (3) rounds of BENCH_SECONDS (3) of
wrk per row, each after a 1 s warm-up. Per row: requests per second and p99 at 32 connections, p50 and p99 at
1 connection (wrk's), and the gateway's CPU time per request (utime + stime of its process tree from /proc,
over the 32-connection runs; SQLite's thread is in it, Redis's own CPU is its column). Only sanity is
asserted: every answer a 200 with the whole body; the slots' store operations ran on the configured store
(and none on memory or without a limit), none failed, none fell back; only the queue rows queued, and none
of their requests timed out; the backend never had more speech requests in flight at once than a row's
limit, and had exactly that many in the queue rows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import DEMO_KEY
from tests.metering_support import Samples, scrape
from tests.perf import rig
from tests.perf.perfkit import environment, print_table
from tests.support import free_port

SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = 32
NEVER_QUEUES, QUEUES = 10_000, 4
"""The limits: one never reached at 32 connections, one that makes 28 of them wait."""
HOLD_MS = 5
"""How long the backend waits before each answer, so that its requests overlap as an engine's do."""
PCM = b"".join(int(8000 * math.sin(2 * math.pi * 375 * i / 24_000)).to_bytes(2, "little", signed=True)
               for i in range(6_000))
"""The backend's whole answer: 0.25 s of 24 kHz 16-bit mono, 12,000 bytes, one chunk."""
SPEECH = {"model": "tts-1", "voice": "nova", "response_format": "pcm", "input": "Hello there, a short one."}

DIRECT, OFF = "direct to the backend", "gateway, no max_concurrency"
MEMORY, SQLITE, REDIS = (f"max_concurrency {NEVER_QUEUES}, {store}" for store in ("memory", "sqlite", "redis"))
QUEUE_MEMORY, QUEUE_SQLITE = (f"max_concurrency {QUEUES} (queues), {store}" for store in ("memory", "sqlite"))
FEW = f"gateway, no max_concurrency, {QUEUES} conn (not 32)"
"""The no-limit gateway at the queue rows' concurrency: a gateway serving fewer requests a second spends more
CPU on each (fewer requests per wake-up of its event loop), so the queue's own cost is a queue row's CPU
against this row's, not against the 32-connection one's."""


@dataclass
class Row(rig.Measured):
    """One configuration (its `wide` runs at `connections`)."""

    limit: int | None = None
    store: str = "memory"
    peaks: list[int] = field(default_factory=list)
    """The backend's most speech requests in flight at once, per round (warm-ups included)."""
    served: int = 0
    """Answers of every run, warm-ups included: what the gateway's counters saw."""
    connections: int = CONNECTIONS
    """Of the `wide` runs."""
    singles: bool = True
    """Whether to measure at 1 connection too."""

    @property
    def cpu_us_per_round(self) -> list[float]:
        return [cpu / load.requests * 1e6 for cpu, load in zip(self.cpu, self.wide, strict=True)]

    def measure(self, script: Path, peak_url: str) -> None:
        backend_peak(peak_url)  # from here on
        warm = self.run_wide(script, self.connections, SECONDS)
        self.served += warm.requests + self.wide[-1].requests
        if self.singles:
            warm_single = self.run_single(script, SECONDS)
            self.served += warm_single.requests + self.single[-1].requests
        self.peaks.append(backend_peak(peak_url))


def backend_peak(url: str) -> int:
    """The backend's most speech requests in flight at once since the last call (tests/perf/backend.py)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return int(json.load(response)["peak"])


def limited(base: str, limit: int, state: str) -> str:
    """`base` with `max_concurrency: limit` on its one backend, slots counted in `state`."""
    line = 'api_key: "bench-engine-key"}'
    assert base.count(line) == 1, "rig.GATEWAY_YAML changed shape"
    return base.replace(line, line[:-1] + f", max_concurrency: {limit}}}") + f"state: {state}\n"


pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)")


def test_admission_overhead(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "speech.pcm").write_bytes(PCM)
    (tmp_path / "speech.json").write_text(json.dumps(SPEECH))
    script = rig.wrk_script(tmp_path / "speech.lua", tmp_path / "speech.json", "application/json", DEMO_KEY)
    notes: list[str] = []
    with ExitStack() as stack:
        backend_url, _ = stack.enter_context(rig.backend(tmp_path / "speech.pcm", len(PCM), HOLD_MS))
        base = rig.gateway_yaml(tmp_path / "spool", backend_url)

        def sqlite(i: int) -> str:  # a file per gateway: each counts its own slots of `engine`
            return f"{{backend: sqlite, path: {tmp_path / f'state-{i}.db'}, timeout_s: 5}}"

        gateways: dict[str, tuple[str, int | None, str, int | None]] = {
            OFF: (base + "state: {backend: memory}\n", None, "memory", None),
            MEMORY: (limited(base, NEVER_QUEUES, "{backend: memory}"), NEVER_QUEUES, "memory", None),
            SQLITE: (limited(base, NEVER_QUEUES, sqlite(2)), NEVER_QUEUES, "sqlite", None)}
        redis = stack.enter_context(rig.redis(tmp_path / "redis"))
        if redis is None:
            notes.append("redis row skipped: `redis-server` is not on PATH (apt-get install redis-server)")
        else:
            gateways[REDIS] = (limited(base, NEVER_QUEUES, f"{{backend: redis, url: '{redis[0]}', timeout_s: 5}}"),
                               NEVER_QUEUES, "redis", redis[1])
        gateways[QUEUE_MEMORY] = (limited(base, QUEUES, "{backend: memory}"), QUEUES, "memory", None)
        gateways[QUEUE_SQLITE] = (limited(base, QUEUES, sqlite(6)), QUEUES, "sqlite", None)
        rows = [Row(DIRECT, backend_url, None)]
        for i, (name, (yaml, limit, store, store_pid)) in enumerate(gateways.items()):
            path = tmp_path / f"gateway-{i}.yaml"
            path.write_text(yaml)
            url, pid = stack.enter_context(rig.gateway(path, free_port(), tmp_path / f"gateway-{i}.log"))
            rows.append(Row(name, url, pid, store_pid, limit=limit, store=store))
            if name == OFF:
                rows.append(Row(FEW, url, pid, connections=QUEUES, singles=False))
        for round_ in range(ROUNDS):  # each takes every place in the order in turn: drift hits all alike
            for row in rows[round_ % len(rows):] + rows[: round_ % len(rows)]:
                row.measure(script, backend_url + "/peak")
        scraped = {row.name: scrape(row.url.removesuffix("/v1") + "/metrics")[1] for row in rows[1:]}
    report(rows, scraped, notes)

    for row in rows:
        for load in row.loads:
            assert load.requests > 0 and load.errors == 0, (row.name, load)
            assert load.bytes >= load.requests * len(PCM), f"{row.name}: short answers"
        if row.limit is not None:
            assert max(row.peaks) <= row.limit, (row.name, row.peaks)
    for row in rows[1:]:
        samples = scraped[row.name]
        trouble = {name: v for (name, _), v in samples.items()
                   if name in ("gateway_state_errors_total", "gateway_state_fallbacks_total") and v}
        assert not trouble, (row.name, trouble)
        ops = store_ops(samples)
        if row.limit is None or row.store == "memory":
            assert not ops, (row.name, ops)  # no slot leased from a store
        else:
            assert ops.get("acquire", 0) >= row.served and ops.get("release", 0) >= row.served, \
                (row.name, row.served, ops)
        queued = queue_waits(samples)
        if row.limit == QUEUES:
            assert queued.get("admitted", 0) > 0 and "timeout" not in queued, queued  # `left`: wrk hung up
            assert max(row.peaks) == QUEUES, row.peaks  # the limit was reached, not only kept
        else:
            assert not queued, (row.name, queued)


def store_ops(samples: Samples) -> dict[str, float]:
    """State-store operations by op (gateway_state_operation_seconds's counts)."""
    return {dict(labels)["op"]: v for (name, labels), v in samples.items()
            if name == "gateway_state_operation_seconds_count"}


def queue_waits(samples: Samples) -> dict[str, float]:
    """Requests that left the backend's queue, by outcome (admitted, timeout, left)."""
    return {dict(labels)["outcome"]: v for (name, labels), v in samples.items()
            if name == "gateway_backend_queue_wait_seconds_count" and v}


def wait_summary(samples: Samples, served: int) -> str:
    """The queue wait histogram of admitted requests: how many waited, the mean, and the bucket bounds that
    hold the median and the 99th percentile."""
    def of(suffix: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(labels), v) for (name, labels), v in samples.items()
                if name == f"gateway_backend_queue_wait_seconds_{suffix}" and dict(labels)["outcome"] == "admitted"]

    count = sum(v for _, v in of("count"))
    if not count:
        return "no request queued"
    mean = sum(v for _, v in of("sum")) / count
    buckets = sorted((float(labels["le"]), v) for labels, v in of("bucket"))

    def bound(q: float) -> str:
        le = next(le for le, v in buckets if v >= q * count)
        return f"<= {le * 1000:g} ms" if le != math.inf else "> the last bucket"

    return (f"{count:.0f} of {served} answers waited in the queue ({count / served:.0%}); wait mean "
            f"{mean * 1000:.1f} ms, p50 {bound(0.5)}, p99 {bound(0.99)} (histogram buckets)")


def report(rows: list[Row], scraped: dict[str, Samples], notes: list[str]) -> None:
    off = next(row for row in rows if row.name == OFF)
    table = [[r.name, sum(load.requests for load in r.loads), r.rps, r.wide_p99_ms, r.p50_ms, r.p99_ms, r.cpu_us,
              r.store_cpu_us, r.cpu_us - off.cpu_us, r.p50_ms - off.p50_ms, max(r.peaks)] for r in rows]
    per_round = [f"{r.name}: req/s {' '.join(f'{x.rps:.0f}' for x in r.wide)}"
                 + (f"; p50 ms {' '.join(f'{x.p50_ms:.2f}' for x in r.single)}" if r.single else "")
                 + (f"; gateway CPU us/req {' '.join(f'{us:.0f}' for us in r.cpu_us_per_round)}" if r.cpu else "")
                 for r in rows]
    ops = [f"{r.name}: store operations per answer (warm-ups and all): "
           + " ".join(f"{op} {n / r.served:.2f}" for op, n in sorted(store_ops(scraped[r.name]).items()))
           for r in rows if r.limit is not None and r.store != "memory"]
    few = next(row for row in rows if row.name == FEW)
    queue = [f"{r.name}: {wait_summary(scraped[r.name], r.served)}; gateway CPU us/req "
             f"{r.cpu_us - few.cpu_us:+.0f} against '{FEW}'" for r in rows if r.limit == QUEUES]
    print_table(f"Admission overhead: speech, {len(PCM)} B PCM answer after {HOLD_MS} ms, {ROUNDS} x {SECONDS:g} s "
                "of wrk per row",
                ["configuration", "requests", f"req/s @{CONNECTIONS}", f"p99 ms @{CONNECTIONS}", "p50 ms @1",
                 "p99 ms @1", "gw CPU us/req", "redis CPU us/req", "+gw CPU us/req", "+p50 ms", "backend peak"],
                table,
                note="\n".join([f"gateways on cores {rig.PROXY_CORES}, backend, wrk and redis-server on "
                                f"{rig.LOAD_CORES}; + columns against '{OFF}'; {environment()}",
                                *per_round, *ops, *queue, *notes]))
