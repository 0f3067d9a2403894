"""What the gateway costs in front of an OpenAI-compatible engine: each figure next to the same load sent
straight to the engine double in the same run.

Run: .venv/bin/python -m pytest tests/perf/test_proxy_overhead.py -q -s -p no:cacheprovider

The gateway and the double share the `servers` event loop (and the load generator shares the process),
so absolute numbers are those of one Python process on this machine; the ratios are the point. Only
loose sanity bounds are asserted, so these never flake on a slow machine.
"""

from __future__ import annotations

import asyncio
import io
import math
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.audio.duration import upload_seconds
from gateway.handlers import transcribe as transcribe_handler
from tests.conftest import DEMO_KEY, Gateway, ServerThread, engine_config
from tests.fakes.openai_engine import FakeOpenAIEngine, speech_seconds, synth
from tests.perf.perfkit import MB, LoadResult, LoopLag, RssSampler, environment, median, pct, print_table, run_load

ROOT = Path(__file__).parent.parent.parent
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}
SHORT = "Hello there! This is a short sentence for speech."  # ~50 characters, 3.0 s of audio from the double
LONG = ("The quick brown fox jumps over the lazy dog while the band plays on. " * 9)[:600]
CONCURRENCY = 8
SPEECH_REQUESTS = 1500
TRANSCRIPTION_REQUESTS = 400
BIG_UPLOAD_BYTES = 20 * MB


@pytest.fixture(scope="module", autouse=True)
def _report_environment() -> Iterator[None]:
    print(f"\n[{__name__}] before: {environment()}")
    yield
    print(f"\n[{__name__}] after: {environment()}")


def speech_sender(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Callable[..., Any]:
    return lambda session: session.post(url, json=body, headers=headers)


def transcription_sender(url: str, audio: bytes, headers: dict[str, str] | None = None) -> Callable[..., Any]:
    def send(session: aiohttp.ClientSession) -> Any:
        form = aiohttp.FormData()
        form.add_field("model", "whisper-1")
        form.add_field("response_format", "json")
        form.add_field("file", audio, filename="five.wav", content_type="audio/wav")
        return session.post(url, data=form, headers=headers)
    return send


def load_row(label: str, result: LoadResult, lag: LoopLag, baseline: LoadResult | None = None) -> list[Any]:
    added = "-" if baseline is None else f"{result.p50_ms - baseline.p50_ms:+.2f}"
    cpu_added = "-" if baseline is None else f"{result.cpu_ms_per_request - baseline.cpu_ms_per_request:+.3f}"
    return [label, result.requests, result.errors, round(result.rps, 1), result.p50_ms, result.p95_ms,
            result.p99_ms, added, result.cpu_ms_per_request, cpu_added, lag.max_ms]


LOAD_HEADERS = ["path", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms", "p50 added ms",
                "CPU ms/req", "CPU added ms/req", "loop lag max ms"]
LOAD_NOTE = ("CPU ms/req: CPU time of the whole process (load generator + servers + worker threads) per request;\n"
             "steadier than req/s when other work shares the machine. 'added' columns: minus the direct row.\n"
             "The gateway and the double share one event loop, so the gateway path also pays for the double.")


def test_speech_passthrough_throughput(servers: ServerThread, engine: FakeOpenAIEngine, gateway: Gateway,
                                       make_gateway: Callable[[str], Gateway], tmp_path: Path) -> None:
    unmetered = make_gateway(engine_config(engine.url, tmp_path / "spool", "metrics: {enabled: false}\n"))
    body = {"model": "tts-1", "voice": "nova", "input": SHORT, "response_format": "mp3"}
    direct = speech_sender(f"{engine.url}/audio/speech", body)
    proxied = speech_sender(f"{gateway.base_url}/audio/speech", body, AUTH)
    proxied_unmetered = speech_sender(f"{unmetered.base_url}/audio/speech", body, AUTH)
    for send in (direct, proxied, proxied_unmetered):
        run_load(send, 100, CONCURRENCY)
    with LoopLag(servers.loop) as lag_direct:
        base = run_load(direct, SPEECH_REQUESTS, CONCURRENCY)
    with LoopLag(servers.loop) as lag_gateway:
        via = run_load(proxied, SPEECH_REQUESTS, CONCURRENCY)
    with LoopLag(servers.loop) as lag_unmetered:
        via_unmetered = run_load(proxied_unmetered, SPEECH_REQUESTS, CONCURRENCY)
    size = len(synth("mp3", speech_seconds(SHORT)))
    print_table(
        f"Speech passthrough: mp3, {len(SHORT)}-char input ({size} B body), {CONCURRENCY} concurrent clients",
        LOAD_HEADERS,
        [load_row("direct to engine double", base, lag_direct),
         load_row("through the gateway (default: metered)", via, lag_gateway, base),
         load_row("gateway, metrics off (no metering)", via_unmetered, lag_unmetered, base)],
        note=LOAD_NOTE + "\nMetered mp3 output is spooled and demuxed once per request (in a thread) to bill its\n"
                         "seconds; 'metrics off' turns metering off entirely (ledger is off in both).")
    assert base.errors == via.errors == via_unmetered.errors == 0
    assert via.bytes_in == base.bytes_in == via_unmetered.bytes_in == SPEECH_REQUESTS * size
    assert via.cpu_ms_per_request < 25 * base.cpu_ms_per_request, "the gateway costs over 25x the engine's work"
    assert via.p50_ms < 1000


async def _ttfb(url: str, body: dict[str, Any], headers: dict[str, str] | None, n: int,
                full: int) -> tuple[list[float], list[float], int]:
    """n times: time to the first body byte (then hang up); `full` times: time to the last byte."""
    firsts: list[float] = []
    totals: list[float] = []
    size = 0
    async with aiohttp.ClientSession() as session:
        for i in range(n + full):
            started = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as response:
                assert response.status == 200, await response.text()
                first = await response.content.readany()
                assert first
                if i < n:
                    firsts.append(time.perf_counter() - started)
                    response.close()
                    continue
                size = len(first) + len(await response.read())
                totals.append(time.perf_counter() - started)
    return firsts, totals, size


def test_streamed_speech_time_to_first_byte(servers: ServerThread, engine: FakeOpenAIEngine,
                                            gateway: Gateway) -> None:
    engine.chunk_size, engine.chunk_delay = 4096, 0.02
    body = {"model": "tts-1", "voice": "nova", "input": LONG, "response_format": "mp3"}
    direct_url, gateway_url = f"{engine.url}/audio/speech", f"{gateway.base_url}/audio/speech"
    synth("mp3", speech_seconds(LONG))  # the double's audio is cached from here on
    asyncio.run(_ttfb(direct_url, body, None, 2, 0))
    asyncio.run(_ttfb(gateway_url, body, AUTH, 2, 0))
    rows = []
    results = {}
    for label, url, headers in (("direct to engine double", direct_url, None),
                                ("through the gateway", gateway_url, AUTH)):
        with LoopLag(servers.loop) as lag:
            firsts, totals, size = asyncio.run(_ttfb(url, body, headers, 20, 2))
        results[label] = firsts
        rows.append([label, median(firsts) * 1000, pct(firsts, 90) * 1000, max(firsts) * 1000,
                     median(totals) * 1000, size, math.ceil(size / 4096), lag.max_ms])
    added = (median(results["through the gateway"]) - median(results["direct to engine double"])) * 1000
    print_table(
        f"Streamed speech: {len(LONG)}-char input, mp3, 4096 B chunks every 20 ms (TTFB n=20, full stream n=2)",
        ["path", "TTFB p50 ms", "TTFB p90 ms", "TTFB max ms", "last byte ms", "bytes", "chunks",
         "loop lag max ms"], rows,
        note=f"gateway adds {added:+.2f} ms to the median time to first byte; 'last byte' ~ chunks x 20 ms in\n"
             "both paths means the gateway relays as chunks arrive (no buffering).")
    assert added < 50, f"the gateway adds {added:.1f} ms before the first audio byte"
    assert abs(rows[1][4] - rows[0][4]) < 1000, "the gateway delays the stream's end"


def test_transcription_passthrough(servers: ServerThread, engine: FakeOpenAIEngine, gateway: Gateway,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    wav = synth("wav", 5.0)
    direct = transcription_sender(f"{engine.url}/audio/transcriptions", wav)
    proxied = transcription_sender(f"{gateway.base_url}/audio/transcriptions", wav, AUTH)
    run_load(direct, 50, CONCURRENCY)
    run_load(proxied, 50, CONCURRENCY)
    with LoopLag(servers.loop) as lag_direct:
        base = run_load(direct, TRANSCRIPTION_REQUESTS, CONCURRENCY)
    with LoopLag(servers.loop) as lag_gateway:
        via = run_load(proxied, TRANSCRIPTION_REQUESTS, CONCURRENCY)
    monkeypatch.setattr(transcribe_handler, "upload_seconds", lambda file, limit: 5.0)
    with LoopLag(servers.loop) as lag_noprobe:
        noprobe = run_load(proxied, TRANSCRIPTION_REQUESTS, CONCURRENCY)
    monkeypatch.undo()
    print_table(
        f"Transcription passthrough: 5 s WAV ({len(wav) // 1024} KiB, 24 kHz s16 mono), json, "
        f"{CONCURRENCY} concurrent clients", LOAD_HEADERS,
        [load_row("direct to engine double", base, lag_direct),
         load_row("through the gateway", via, lag_gateway, base),
         load_row("gateway, duration probe stubbed", noprobe, lag_noprobe, base)],
        note=LOAD_NOTE + "\n'probe stubbed' replaces gateway.audio.duration.upload_seconds (measuring the\n"
                         "upload to bill its seconds) with a constant; the thread hop to run it stays.\n"
                         "Uploads > 64 KiB spool to disk")

    rows = []
    for fmt in ("wav", "flac", "mp3", "aac", "opus"):
        row: list[Any] = [fmt]
        for length in (5.0, 60.0):
            data = synth(fmt, length)
            seconds = upload_seconds(io.BytesIO(data), 7200)
            n = 20
            started = time.perf_counter()
            for _ in range(n):
                upload_seconds(io.BytesIO(data), 7200)
            per_call = (time.perf_counter() - started) / n
            row += [len(data), per_call * 1000]
            assert abs(seconds - length) < 0.2, (fmt, length, seconds)
        rows.append(row)
    print_table("Duration probe (billing) per upload, called directly in this thread, n=20",
                ["format", "5 s bytes", "5 s ms", "60 s bytes", "60 s ms"], rows,
                note="WAV is measured by its header, whatever its length; other formats by demuxing their\n"
                     "packets (no decoding), so their cost grows with the number of packets.")
    assert base.errors == via.errors == noprobe.errors == 0
    assert via.cpu_ms_per_request < 25 * base.cpu_ms_per_request


ENGINE_PROCESS = """
import asyncio, sys
from tests.fakes.openai_engine import FakeOpenAIEngine

async def main():
    async with FakeOpenAIEngine() as engine:
        print(engine.url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


@pytest.fixture
def engine_process() -> Iterator[str]:
    """The engine double in a process of its own (it holds whole uploads in memory), so that this
    process's RSS is the gateway's (and the client's) alone. Yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-c", ENGINE_PROCESS], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), "the engine process did not start"
        yield url
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def write_wav(path: Path, data_bytes: int, rate: int = 24_000) -> float:
    """A tone WAV with `data_bytes` of 16-bit mono samples, written in pieces; its seconds."""
    period = b"".join(int(8000 * math.sin(2 * math.pi * i / 64)).to_bytes(2, "little", signed=True)
                      for i in range(64))
    piece = period * (MB // len(period))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        for _ in range(data_bytes // len(piece)):
            w.writeframes(piece)
    return data_bytes / 2 / rate


async def _upload(url: str, path: Path, headers: dict[str, str] | None) -> tuple[float, int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        with path.open("rb") as f:
            form = aiohttp.FormData()
            form.add_field("model", "whisper-1")
            form.add_field("response_format", "json")
            form.add_field("file", f, filename=path.name, content_type="audio/wav")
            started = time.perf_counter()
            async with session.post(url, data=form, headers=headers) as response:
                text = await response.text()
                return time.perf_counter() - started, response.status, text


def test_large_upload_is_spooled_not_buffered(servers: ServerThread, engine_process: str, tmp_path: Path,
                                              make_gateway: Callable[[str], Gateway]) -> None:
    config = engine_config(engine_process, tmp_path / "spool").replace(
        "max_upload_bytes: 2000000", f"max_upload_bytes: {BIG_UPLOAD_BYTES + MB}").replace(
        "timeout_s: 2", "timeout_s: 60")
    gateway = make_gateway(config)
    big, small = tmp_path / "big.wav", tmp_path / "small.wav"
    seconds = write_wav(big, BIG_UPLOAD_BYTES)
    write_wav(small, 2 * MB)
    direct_url, gateway_url = f"{engine_process}/audio/transcriptions", f"{gateway.base_url}/audio/transcriptions"
    for url, headers in ((direct_url, None), (gateway_url, AUTH)):  # warm up: threads, codecs, connections
        for _ in range(2):
            assert asyncio.run(_upload(url, small, headers))[1] == 200
    rows = []
    growth: dict[str, list[int]] = {"direct": [], "gateway": []}
    for run in range(2):
        for label, url, headers in (("direct", direct_url, None), ("gateway", gateway_url, AUTH)):
            with LoopLag(servers.loop) as lag, RssSampler() as rss:
                elapsed, status, text = asyncio.run(_upload(url, big, headers))
            assert status == 200, text
            growth[label].append(rss.growth)
            hwm = "-" if rss.growth_hwm is None else f"{rss.growth_hwm / MB:.2f}"
            rows.append([f"{label} (run {run + 1})", elapsed * 1000, BIG_UPLOAD_BYTES / MB / elapsed,
                         rss.before / MB, rss.growth_sampled / MB, hwm, rss.samples, lag.max_ms])
    leftovers = list((tmp_path / "spool").iterdir())
    print_table(
        f"Large upload: {BIG_UPLOAD_BYTES // MB} MiB WAV ({seconds:.0f} s of audio), transcription json; "
        "engine double in a separate process", ["path", "time ms", "MiB/s", "RSS before MiB",
                                                "peak growth sampled MiB", "peak growth VmHWM MiB",
                                                "RSS samples", "loop lag max ms"], rows,
        note="RSS is this test process's: the client and (for 'gateway') the whole gateway. The 'direct' rows\n"
             "measure the client alone. VmHWM is the kernel's peak mark, reset before each upload (clear_refs).\n"
             f"Spool files left afterwards: {len(leftovers)}.")
    assert not leftovers
    assert min(growth["gateway"]) < 10 * MB, f"RSS grew by {min(growth['gateway']) / MB:.1f} MiB during the upload"
