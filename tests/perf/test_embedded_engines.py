"""The light embedded config (config/examples/embedded-lite.yaml: eSpeak NG in its child process, PocketSphinx
in-process): latency, real-time factors and transcoding throughput through the gateway, each next to the adapter
called directly on the same event loop in the same run (no HTTP, no transcoding, no metering) as the baseline.

Run: .venv/bin/python -m pytest tests/perf/test_embedded_engines.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.adapters import espeak, pocketsphinx
from gateway.adapters.base import SpeechJob, TranscriptionJob
from gateway.audio.duration import encoded_seconds, upload_seconds
from gateway.audio.workers import AudioWorkers
from gateway.config import NativeVoice
from gateway.spool import Upload
from gateway.state import TABLES
from tests.conftest import Gateway, ServerThread, start_gateway
from tests.perf.perfkit import LoopLag, environment, median, pct, print_table, run_load

pytestmark = pytest.mark.skipif(bool(espeak.unavailable_reason() or pocketsphinx.unavailable_reason()),
                                reason="the embedded engines are not installed")

ROOT = Path(__file__).parent.parent.parent
AUTH = {"Authorization": "Bearer sk-gateway-demo"}
VOICE = "alloy"
PROSE = ("Hello world, this is a test of the speech system. The weather today is sunny and warm. "
         "Please call me back when you get home. We will meet at the station at noon and walk to the "
         "museum together. Remember to bring the tickets, a warm coat and something to read on the train. "
         "The quick brown fox jumps over the lazy dog while the children play in the garden all afternoon. ")
TEXT_300 = PROSE[:300].rsplit(" ", 1)[0] + "."
TEXT_LONG = (PROSE * 3).strip()
TEXT_10S = ("Hello world, this is a test of the speech system. The weather today is sunny and warm. "
            "Please call me back when you get home tonight, and bring the tickets for the train.")
SMALL = "Hello there! This is a short sentence for speech."
PCM_RATE = 24_000


@pytest.fixture(scope="module", autouse=True)
def _report_environment() -> Iterator[None]:
    print(f"\n[{__name__}] before: {environment()}")
    yield
    print(f"\n[{__name__}] after: {environment()}")


@pytest.fixture(scope="module")
def embedded(servers: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    text = (ROOT / "config" / "examples" / "embedded-lite.yaml").read_text()
    gw = servers.run(start_gateway(text, tmp_path_factory.mktemp("spool")))
    yield gw
    servers.run(gw.runner.cleanup())


def adapter(gw: Gateway, name: str) -> Any:
    return gw.app[TABLES].current.adapters[name]


def native_voice(gw: Gateway) -> NativeVoice:
    return gw.app[TABLES].current.voice(VOICE, "espeak")


async def adapter_speak(eng: Any, voice: NativeVoice, text: str) -> tuple[float, float, int, int]:
    """On the servers loop: (first chunk s, total s, bytes, sample rate) of the adapter's own PCM."""
    job = SpeechJob(request_id="bench", public_model="tts-1", model="espeak-ng", voice=voice, input=text,
                    response_format="pcm")
    started = time.perf_counter()
    audio = await eng.synthesize(job)
    first, size = 0.0, 0
    try:
        async for chunk in audio.chunks:
            if not size and chunk:
                first = time.perf_counter() - started
            size += len(chunk)
    finally:
        await audio.chunks.aclose()
    assert audio.format.sample_rate is not None
    return first, time.perf_counter() - started, size, audio.format.sample_rate


async def fetch_speech(url: str, text: str, fmt: str, n: int) -> list[tuple[float, float, bytes]]:
    """n sequential requests: (time to first body byte, time to last byte, body)."""
    body = {"model": "tts-1", "voice": VOICE, "input": text, "response_format": fmt}
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            started = time.perf_counter()
            async with session.post(url, json=body, headers=AUTH) as response:
                assert response.status == 200, await response.text()
                first = await response.content.readany()
                ttfb = time.perf_counter() - started
                data = first + await response.read()
                out.append((ttfb, time.perf_counter() - started, data))
    return out


def audio_seconds(fmt: str, data: bytes) -> float:
    return len(data) / (2 * PCM_RATE) if fmt == "pcm" else encoded_seconds(io.BytesIO(data), fmt)


def test_speech_time_to_first_byte(servers: ServerThread, embedded: Gateway) -> None:
    eng, voice, url, n = adapter(embedded, "espeak"), native_voice(embedded), f"{embedded.base_url}/audio/speech", 10
    servers.run(adapter_speak(eng, voice, TEXT_300))
    asyncio.run(fetch_speech(url, TEXT_300, "mp3", 2))
    with LoopLag(servers.loop) as lag:
        direct = [servers.run(adapter_speak(eng, voice, TEXT_300)) for _ in range(n)]
    rate = direct[0][3]
    seconds = direct[0][2] / 2 / rate
    rows = [["adapter direct (raw PCM)", f"{rate} Hz", median([d[0] for d in direct]) * 1000,
             max(d[0] for d in direct) * 1000, median([d[1] for d in direct]) * 1000, round(seconds, 2),
             round(seconds / median([d[1] for d in direct])), lag.max_ms]]
    results = {}
    for fmt in ("pcm", "mp3"):
        with LoopLag(servers.loop) as lag:
            got = asyncio.run(fetch_speech(url, TEXT_300, fmt, n))
        results[fmt] = got
        out_seconds = audio_seconds(fmt, got[0][2])
        total = median([g[1] for g in got])
        rows.append([f"gateway {fmt} (streamed)", "24000 Hz", median([g[0] for g in got]) * 1000,
                     max(g[0] for g in got) * 1000, total * 1000, round(out_seconds, 2),
                     round(out_seconds / total), lag.max_ms])
    print_table(f"eSpeak NG speech: {len(TEXT_300)}-char input, voice {VOICE} ({voice.id}), n={n} sequential",
                ["path", "rate", "TTFB p50 ms", "TTFB max ms", "total p50 ms", "audio s", "x real-time",
                 "loop lag max ms"], rows,
                note="gateway pcm is resampled from eSpeak's native rate to OpenAI's 24 kHz (a real transcode,\n"
                     "not a passthrough); mp3 is encoded at 64 kbit/s as the audio arrives.")
    assert median([g[0] for g in results["mp3"]]) < 2.0
    assert abs(audio_seconds("mp3", results["mp3"][0][2]) - seconds) < 1.0


def test_transcoding_throughput(servers: ServerThread, embedded: Gateway) -> None:
    eng, voice, url, n = adapter(embedded, "espeak"), native_voice(embedded), f"{embedded.base_url}/audio/speech", 3
    direct = [servers.run(adapter_speak(eng, voice, TEXT_LONG)) for _ in range(n + 1)][1:]
    rate = direct[0][3]
    seconds = direct[0][2] / 2 / rate
    total = median([d[1] for d in direct])
    rows = [["adapter direct (raw PCM)", direct[0][2], round(seconds, 2), median([d[0] for d in direct]) * 1000,
             total * 1000, round(seconds / total), "-", "-"]]
    base_total = None
    for fmt in ("pcm", "wav", "mp3", "opus", "aac", "flac"):
        asyncio.run(fetch_speech(url, TEXT_LONG, fmt, 1))
        with LoopLag(servers.loop) as lag:
            got = asyncio.run(fetch_speech(url, TEXT_LONG, fmt, n))
        fmt_total = median([g[1] for g in got])
        out_seconds = audio_seconds(fmt, got[0][2])
        base_total = base_total or fmt_total
        rows.append([f"gateway {fmt}", len(got[0][2]), round(out_seconds, 2), median([g[0] for g in got]) * 1000,
                     fmt_total * 1000, round(out_seconds / fmt_total), f"{(fmt_total - base_total) * 1000:+.1f}",
                     lag.max_ms])
        assert abs(out_seconds - seconds) < 1.0, (fmt, out_seconds, seconds)
    print_table(f"Transcoding throughput: one {len(TEXT_LONG)}-char input ({seconds:.1f} s of speech), n={n} "
                "sequential, median", ["path", "bytes", "audio s", "TTFB ms", "total ms", "x real-time",
                                       "vs gateway pcm ms", "loop lag max ms"], rows,
                note="x real-time = seconds of audio delivered per second of wall time (synthesis + transcode +\n"
                     "HTTP). 'vs gateway pcm' is the encoder's cost over the pcm (resample-only) path.")


def test_pocketsphinx_real_time_factor(servers: ServerThread, embedded: Gateway) -> None:
    url = f"{embedded.base_url}/audio/transcriptions"
    wav = asyncio.run(fetch_speech(f"{embedded.base_url}/audio/speech", TEXT_10S, "wav", 1))[0][2]
    seconds = upload_seconds(io.BytesIO(wav), 7200)
    sphinx, n = adapter(embedded, "sphinx"), 3

    async def direct_once() -> tuple[float, str]:
        upload = Upload.of("speech.wav", "audio/wav", wav, AudioWorkers(1, 0))
        job = TranscriptionJob(request_id="bench", task="transcribe", public_model="whisper-1", model="en-us",
                               upload=upload)
        started = time.perf_counter()
        transcript = await sphinx.transcribe(job)
        return time.perf_counter() - started, transcript.text

    async def gateway_once(session: aiohttp.ClientSession) -> tuple[float, str]:
        form = aiohttp.FormData()
        form.add_field("model", "whisper-1")
        form.add_field("file", wav, filename="speech.wav", content_type="audio/wav")
        started = time.perf_counter()
        async with session.post(url, data=form, headers=AUTH) as response:
            assert response.status == 200, await response.text()
            text = (await response.json())["text"]
        return time.perf_counter() - started, text

    async def via_gateway(k: int) -> list[tuple[float, str]]:
        async with aiohttp.ClientSession() as session:
            return [await gateway_once(session) for _ in range(k)]

    servers.run(direct_once())
    with LoopLag(servers.loop) as lag_direct:
        direct = [servers.run(direct_once()) for _ in range(n)]
    with LoopLag(servers.loop) as lag_gateway:
        via = asyncio.run(via_gateway(n))
    started = time.perf_counter()
    for _ in range(10):
        upload_seconds(io.BytesIO(wav), 7200)
    probe_ms = (time.perf_counter() - started) / 10 * 1000
    rows = []
    for label, runs, lag in (("adapter direct", direct, lag_direct), ("through the gateway", via, lag_gateway)):
        elapsed = [r[0] for r in runs]
        rows.append([label, median(elapsed) * 1000, max(elapsed) * 1000, median(elapsed) / seconds, lag.p99_ms,
                     lag.max_ms, len(runs[0][1].split())])
    print_table(f"PocketSphinx transcription: {seconds:.1f} s of eSpeak speech ({len(wav) // 1024} KiB WAV), "
                f"json, n={n} sequential", ["path", "p50 ms", "max ms", "real-time factor", "loop lag p99 ms",
                                            "loop lag max ms", "words heard"], rows,
                note=f"the gateway also measures the upload (WAV: its header) to bill it: {probe_ms:.2f} ms.\n"
                     f"heard (gateway): {via[0][1]!r}")
    assert median([r[0] for r in via]) / seconds < 3.0
    assert via[0][1] == direct[0][1]


def test_concurrent_small_speech(servers: ServerThread, embedded: Gateway) -> None:
    eng, voice, url = adapter(embedded, "espeak"), native_voice(embedded), f"{embedded.base_url}/audio/speech"

    async def direct_load(total: int, concurrency: int) -> tuple[float, list[float]]:
        latencies: list[float] = []
        pending = iter(range(total))

        async def worker() -> None:
            for _ in pending:
                started = time.perf_counter()
                await adapter_speak(eng, voice, SMALL)
                latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies

    rows = []
    servers.run(direct_load(20, 1))
    for concurrency, total in ((1, 100), (8, 200)):
        with LoopLag(servers.loop) as lag:
            wall, latencies = servers.run(direct_load(total, concurrency))
        rows.append([f"adapter direct, pcm, c={concurrency}", total, 0, total / wall, pct(latencies, 50) * 1000,
                     pct(latencies, 95) * 1000, lag.max_ms])
    for fmt in ("pcm", "mp3"):
        body = {"model": "tts-1", "voice": VOICE, "input": SMALL, "response_format": fmt}

        def send(session: aiohttp.ClientSession, body: dict[str, Any] = body) -> Any:
            return session.post(url, json=body, headers=AUTH)
        for concurrency, total in ((1, 100), (8, 200)):
            with LoopLag(servers.loop) as lag:
                result = run_load(send, total, concurrency, warmup=10)
            rows.append([f"gateway {fmt}, c={concurrency}", total, result.errors, result.rps, result.p50_ms,
                         result.p95_ms, lag.max_ms])
            assert result.errors == 0
    print_table(f"Concurrent small speech: {len(SMALL)}-char input, c = concurrent clients",
                ["path", "requests", "errors", "req/s", "p50 ms", "p95 ms", "loop lag max ms"], rows,
                note="eSpeak NG has one child process per backend, synthesizing one request at a time, so\n"
                     "synthesis is serialized: more clients raise latency, not throughput; transcoding runs\n"
                     "on per-stream threads.")
