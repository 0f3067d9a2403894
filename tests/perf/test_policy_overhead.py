"""What the traffic policy costs per request: speech through the gateway with no limits, against the same
with a key limit, a tenant concurrency limit and a tenant budget counted on SQLite and on a real
redis-server, in one run, against one backend (tests/perf/backend.py answering a small PCM body).

Run: .venv/bin/python -m pytest tests/perf/test_policy_overhead.py -q -s -p no:cacheprovider
Needs `wrk`; the redis row needs `redis-server` (without it that row is skipped and said so).

The policy takes every kind of store step on each request and refuses none: a hit on the key's
{requests: 1e15, per: minute}, a lease on the tenant's {concurrent: 1e9} (acquire, release), a reservation
on the tenant's {usd: 1e12} budget with tts-1 priced (reserve, settle, and the `spent` read behind
gateway_budget_remaining): three store round trips a request, `take` (hit, acquire, reserve at once),
`give` of the lease as the last byte goes out, `give` of the settlement once the request is over.
The three gateways run side by side on core 0 (tests/perf/rig.py), the backend, wrk and redis-server on
core 1, and take turns, BENCH_ROUNDS (3) rounds of BENCH_SECONDS (3) of wrk per row, after a 1 s warm-up.
Per configuration: requests per second at 32 connections, p50 and p99 at 1 connection (wrk's), and the
gateway's CPU time per request (utime + stime of its process tree from /proc, over the 32-connection
runs; with SQLite the store's thread is in it, Redis's own CPU is its column). Only sanity is asserted:
every answer a 200 with the whole body, the policy's store operations really ran on the configured store,
none failed, none fell back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEMO_KEY
from tests.metering_support import scrape
from tests.perf import rig
from tests.perf.perfkit import environment, print_table
from tests.support import free_port

SECONDS = float(os.environ.get("BENCH_SECONDS", "3"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CONNECTIONS = 32
PCM_SECONDS = 0.25
PCM = b"".join(int(8000 * math.sin(2 * math.pi * 375 * i / 24_000)).to_bytes(2, "little", signed=True)
               for i in range(int(24_000 * PCM_SECONDS)))
"""The backend's whole answer: 0.25 s of 24 kHz 16-bit mono, 12,000 bytes, one chunk."""
SPEECH = {"model": "tts-1", "voice": "nova", "response_format": "pcm", "input": "Hello there, a short one."}
OPS = {"take": 1, "give": 2}
"""The store operations every admitted, billed speech request makes, and how many of each; plus `spent`, the
budget gauge's read, shared by the requests that finish while one is under way (SharedState.read_soon)."""

OFF, SQLITE, REDIS = "(a) no limits", "(b) limits + budget, sqlite", "(c) limits + budget, redis"

POLICY_YAML = """
limits:
  key: [{{requests: 1000000000000000, per: minute}}]
tenants:
  bench:
    limits: [{{concurrent: 1000000000}}]
    budget: {{usd: 1000000000000, period: month}}
state: {state}
"""


@dataclass
class Setup(rig.Measured):
    """One gateway configuration (its `wide` runs at CONNECTIONS)."""

    def measure(self, script: Path) -> None:
        self.run_wide(script, CONNECTIONS, SECONDS)
        self.run_single(script, SECONDS)


pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)")


def test_policy_overhead(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "speech.pcm").write_bytes(PCM)
    (tmp_path / "speech.json").write_text(json.dumps(SPEECH))
    script = rig.wrk_script(tmp_path / "speech.lua", tmp_path / "speech.json", "application/json", DEMO_KEY)
    notes: list[str] = []
    with ExitStack() as stack:
        backend_url, _ = stack.enter_context(rig.backend(tmp_path / "speech.pcm", len(PCM)))
        base = rig.gateway_yaml(tmp_path / "spool", backend_url, tts_price="per_million_characters: 15")  # in every row
        sqlite = f"{{backend: sqlite, path: {tmp_path / 'state.db'}, timeout_s: 5}}"
        states: dict[str, tuple[str, int | None]] = {OFF: ("", None), SQLITE: (POLICY_YAML.format(state=sqlite), None)}
        redis = stack.enter_context(rig.redis(tmp_path / "redis"))
        if redis is None:
            notes.append("redis row skipped: `redis-server` is not on PATH (apt-get install redis-server)")
        else:
            states[REDIS] = (POLICY_YAML.format(state=f"{{backend: redis, url: '{redis[0]}', timeout_s: 5}}"),
                             redis[1])
        configs: list[Setup] = []
        for i, (name, (policy, store_pid)) in enumerate(states.items()):
            path = tmp_path / f"gateway-{i}.yaml"
            path.write_text(base + policy)
            url, pid = stack.enter_context(rig.gateway(path, free_port(), tmp_path / f"gateway-{i}.log"))
            configs.append(Setup(name, url, pid, store_pid))
        for round_ in range(ROUNDS):  # each takes every place in the order in turn: drift hits all alike
            for config in configs[round_ % len(configs):] + configs[: round_ % len(configs)]:
                config.measure(script)
        scraped = {c.name: scrape(c.url.removesuffix("/v1") + "/metrics")[1] for c in configs}
    for config in configs[1:]:
        ops = {dict(labels)["op"]: v for (name, labels), v in scraped[config.name].items()
               if name == "gateway_state_operation_seconds_count"}
        notes.append(f"{config.name}: store operations per request (per take, warm-ups and all): "
                     + " ".join(f"{op} {n / ops.get('take', math.nan):.2f}" for op, n in sorted(ops.items())))
    report(configs, notes)

    for config in configs:
        for load in config.loads:
            assert load.requests > 0 and load.errors == 0, (config.name, load)
            assert load.bytes >= load.requests * len(PCM), f"{config.name}: short answers"
        samples = scraped[config.name]
        ops = {dict(labels)["op"]: v for (name, labels), v in samples.items()
               if name == "gateway_state_operation_seconds_count"}
        trouble = {name: v for (name, _), v in samples.items()
                   if name in ("gateway_state_errors_total", "gateway_state_fallbacks_total") and v}
        assert not trouble, (config.name, trouble)
        served = sum(load.requests for load in config.loads)
        if config.name == OFF:
            assert not ops, ops  # no policy: the store is never touched
        else:
            assert all(ops.get(op, 0) >= n * served for op, n in OPS.items()) and ops.get("spent"), \
                (config.name, served, ops)


def report(configs: list[Setup], notes: list[str]) -> None:
    off = configs[0]
    rows = [[c.name, sum(load.requests for load in c.loads), c.rps, c.p50_ms, c.p99_ms, c.cpu_us, c.store_cpu_us,
             c.p50_ms - off.p50_ms, c.p99_ms - off.p99_ms, c.cpu_us - off.cpu_us] for c in configs]
    per_round = [f"{c.name}: req/s {' '.join(f'{x.rps:.0f}' for x in c.wide)}; p50 ms "
                 f"{' '.join(f'{x.p50_ms:.2f}' for x in c.single)}; gateway CPU us/req "
                 f"{' '.join(f'{cpu / x.requests * 1e6:.0f}' for cpu, x in zip(c.cpu, c.wide, strict=True))}"
                 for c in configs]
    print_table(f"Policy overhead: speech, {len(PCM)} B PCM answer, {ROUNDS} x {SECONDS:g} s of wrk per row",
                ["configuration", "requests", f"req/s @{CONNECTIONS}", "p50 ms @1", "p99 ms @1", "gw CPU us/req",
                 "redis CPU us/req", "+p50 ms", "+p99 ms", "+gw CPU us/req"], rows,
                note="\n".join([f"gateway on cores {rig.PROXY_CORES}, backend, wrk and redis-server on "
                                f"{rig.LOAD_CORES}; {environment()}", *per_round, *notes]))
