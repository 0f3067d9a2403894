"""Requests per proxy CPU-second and latency, the gateway next to nginx and to the backend called directly:
the three scenarios of issue 11 in one run, on one machine, against one backend (tests/perf/backend.py).

Run: make bench, or .venv/bin/python -m pytest tests/perf/test_cpu_per_request.py -q -s -p no:cacheprovider
(BENCH_SECONDS=5 by default: the length of each measured wrk run.) Needs `wrk`; nginx is optional
(`apt-get install wrk nginx`). The proxy under test runs alone on core 0, the backend and wrk on core 1
(tests/perf/rig.py); its CPU time (utime + stime of its process tree, from /proc) is read before and after
each run. The last row, `--workers 2` against `--workers 1`, gives the gateway both cores and compares
requests per second of wall time. Only loose sanity bounds are asserted.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import wave
from dataclasses import dataclass
from pathlib import Path

import av
import pytest

from tests.conftest import DEMO_KEY, sha
from tests.fakes.audio import encode
from tests.perf import rig
from tests.perf.perfkit import environment, print_table
from tests.support import free_port

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
SPEECH_BYTES, SPEECH_CHUNK = 64 * 1024, 8 * 1024
UPLOAD_BYTES = 1024 * 1024
CONNECTIONS = 32
SPEECH = "speech, 64 KiB MP3 in 8 KiB chunks, 32 conn"
UPLOAD = "transcription, 1 MiB WAV upload, 32 conn"
SINGLE = "speech, 1 connection"
TARGETS = {SPEECH: "≥ 2,400 req/CPU-s (≥ 0.38x nginx)", UPLOAD: "≥ 400 req/CPU-s (≥ 0.28x nginx)",
           SINGLE: "≤ +0.5 ms p50"}

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk)")


def mp3_frames(limit: int) -> bytes:
    """Real MP3 (a tone, LAME): the whole frames that fit in `limit` bytes, as PyAV's demuxer cuts them."""
    rate = 24_000
    raw = b"".join(int(8000 * math.sin(2 * math.pi * 375 * i / rate)).to_bytes(2, "little", signed=True)
                   for i in range(rate * 6))
    data = encode(raw, rate, "mp3", "libmp3lame", frame_samples=576, bit_rate=128_000)
    with av.open(io.BytesIO(data)) as container:
        ends = [p.pos + p.size for p in container.demux(container.streams.audio[0]) if p.size and p.pos >= 0]
    cut = max(end for end in ends if end <= limit)
    assert cut > limit * 0.9, "encode more seconds"
    return data[:cut]


def multipart_upload(boundary: str, size: int) -> bytes:
    """A transcription request body whose `file` part is a WAV file of `size` bytes (a 24 kHz tone)."""
    samples = (size - 44) // 2
    pcm = b"".join(int(8000 * math.sin(2 * math.pi * i / 64)).to_bytes(2, "little", signed=True) for i in range(64))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(24_000)
        w.writeframes((pcm * (samples // 64 + 1))[: samples * 2])
    wav = buf.getvalue()
    assert len(wav) == size - size % 2
    head = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in (("model", "whisper-1"), ("response_format", "json")))
    return (head + f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n").encode() + wav + f"\r\n--{boundary}--\r\n".encode()


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
  tts-1: {{task: speech, routes: [{{backend: engine, model: kokoro}}]}}
  whisper-1: {{task: transcription, routes: [{{backend: engine, model: whisper}}]}}
voices:
  nova: {{engine: af_nova}}
"""
"""The shipped defaults (metrics on, ledger off, spool_memory_bytes, audio_workers) with one backend; no drain
delay, so that each gateway stops at once."""


@dataclass
class Row:
    scenario: str
    path: str
    load: rig.Load
    proxy_cpu: float | None
    backend_cpu: float

    @property
    def per_cpu_second(self) -> float:
        return self.load.requests / self.proxy_cpu if self.proxy_cpu else float("nan")


def measure(scenario: str, path: str, url: str, proxy_pid: int | None, backend_pid: int, script: Path,
            connections: int, cores: set[int] | None = rig.LOAD_CORES) -> Row:
    rig.wrk(url, script, connections, 1, cores)  # warm-up: connections, pools, codecs
    proxy_before = rig.tree_cpu_seconds(proxy_pid) if proxy_pid else 0.0
    backend_before = rig.tree_cpu_seconds(backend_pid)
    load = rig.wrk(url, script, connections, SECONDS, cores)
    proxy_cpu = rig.tree_cpu_seconds(proxy_pid) - proxy_before if proxy_pid else None
    return Row(scenario, path, load, proxy_cpu, rig.tree_cpu_seconds(backend_pid) - backend_before)


def test_cpu_per_request(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    speech = mp3_frames(SPEECH_BYTES)
    (tmp_path / "speech.mp3").write_bytes(speech)
    (tmp_path / "speech.json").write_text('{"model": "tts-1", "voice": "nova", "response_format": "mp3", '
                                          '"input": "Hello there! This is a short sentence for speech."}')
    (tmp_path / "upload.body").write_bytes(multipart_upload("bench0boundary", UPLOAD_BYTES))
    form = "multipart/form-data; boundary=bench0boundary"
    scripts = {(name, key): rig.wrk_script(tmp_path / f"{name}-{bool(key)}.lua", tmp_path / body, ctype, key)
               for name, body, ctype in (("speech", "speech.json", "application/json"), ("upload", "upload.body", form))
               for key in (None, DEMO_KEY)}
    scenarios = ((SPEECH, "/audio/speech", "speech", CONNECTIONS), (UPLOAD, "/audio/transcriptions", "upload",
                                                                   CONNECTIONS), (SINGLE, "/audio/speech", "speech", 1))
    rows: list[Row] = []
    notes: list[str] = []
    with rig.backend(tmp_path / "speech.mp3", SPEECH_CHUNK) as (backend_url, backend_pid):
        config = tmp_path / "gateway.yaml"
        config.write_text(GATEWAY_YAML.format(spool=tmp_path / "spool", sha=sha(DEMO_KEY), backend=backend_url))
        for scenario, route, body, connections in scenarios:
            rows.append(measure(scenario, "direct to the backend", backend_url + route, None, backend_pid,
                                scripts[body, None], connections))
            with rig.nginx(backend_url, free_port(), tmp_path / "nginx") as proxy:
                if proxy is None:
                    notes.append(f"{scenario}: nginx column skipped: nginx is not installed (apt-get install nginx)")
                else:
                    rows.append(measure(scenario, "nginx pass-through", proxy[0] + route, proxy[1], backend_pid,
                                        scripts[body, None], connections))
            for loop in ("uvloop", "asyncio"):
                with rig.gateway(config, free_port(), tmp_path / f"gateway-{loop}.log", loop) as (url, pid):
                    rows.append(measure(scenario, f"gateway ({loop})", url + route, pid, backend_pid,
                                        scripts[body, DEMO_KEY], connections))
        if rig.serve_has_workers():
            for workers in (1, 2):
                with rig.gateway(config, free_port(), tmp_path / f"gateway-w{workers}.log", "auto", workers,
                                 cores=None) as (url, pid):
                    rows.append(measure(f"{UPLOAD}, both cores", f"gateway --workers {workers}",
                                        url + "/audio/transcriptions", pid, backend_pid, scripts["upload", DEMO_KEY],
                                        CONNECTIONS, cores=None))
            notes.append(f"--workers 2 / --workers 1, req/s of wall time: {rows[-1].load.rps / rows[-2].load.rps:.2f}x "
                         "(target ≥ 1.7x); the backend and wrk share the two cores with the gateway there")
        else:
            notes.append("--workers rows skipped: `gateway serve --help` lists no --workers option")
    report(rows, notes, len(speech))
    for row in rows:
        assert row.load.requests > 0 and row.load.errors == 0, row
        if row.path != "direct to the backend":
            assert row.proxy_cpu and row.proxy_cpu > 0, row
    for row in rows:
        if row.scenario in (SPEECH, SINGLE):
            assert row.load.bytes >= row.load.requests * len(speech), f"{row.path}: short speech answers"
    direct = {r.scenario: r for r in rows if r.path == "direct to the backend"}
    single = [r for r in rows if r.scenario == SINGLE and r.path.startswith("gateway")]
    assert all(r.load.p50_ms - direct[SINGLE].load.p50_ms < 50 for r in single), "the gateway adds over 50 ms"


def report(rows: list[Row], notes: list[str], speech_bytes: int) -> None:
    nginx = {r.scenario: r.per_cpu_second for r in rows if r.path == "nginx pass-through"}
    direct = {r.scenario: r.load.p50_ms for r in rows if r.path == "direct to the backend"}
    print_table(
        f"Requests per proxy CPU-second, {SECONDS:g} s of wrk per row", ["scenario", "path", "requests", "errors",
        "req/s", "proxy CPU s", "req/proxy CPU-s", "x nginx", "p50 ms", "p99 ms", "p50 added ms", "backend ms/req"],
        [[r.scenario, r.path, r.load.requests, r.load.errors, r.load.rps, r.proxy_cpu or float("nan"),
          r.per_cpu_second, r.per_cpu_second / nginx.get(r.scenario, float("nan")), r.load.p50_ms, r.load.p99_ms,
          r.load.p50_ms - direct.get(r.scenario, float("nan")), r.backend_cpu / r.load.requests * 1000]
         for r in rows],
        note="\n".join([f"speech answer: {speech_bytes} B of MP3 frames; proxy on cores {rig.PROXY_CORES}, backend and "
                        f"wrk on {rig.LOAD_CORES}; {environment()}", *notes]))
    summary = []
    for scenario in (SPEECH, UPLOAD, SINGLE):
        cells = {r.path: r for r in rows if r.scenario == scenario}
        def cell(path: str, scenario: str = scenario, cells: dict[str, Row] = cells) -> str:
            row = cells.get(path)
            if row is None:
                return "-"
            if scenario == SINGLE:
                return f"{row.load.p50_ms - direct[scenario]:+.2f} ms"
            return f"{row.per_cpu_second:,.0f}"
        summary.append([scenario, cell("nginx pass-through"), cell("gateway (uvloop)"), cell("gateway (asyncio)"),
                        TARGETS[scenario]])
    print_table("In the issue's shape (req per proxy CPU-second; 1 connection: p50 added over direct)",
                ["scenario", "nginx pass-through", "gateway, uvloop", "gateway, asyncio", "target"], summary)
