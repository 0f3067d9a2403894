"""The app's one audio worker pool (gateway/audio/workers.py): a burst of transcoded streams costs no
thread per stream, the job past `audio_workers + audio_queue` gets the documented 503 before any
byte, and the pool's jobs are all given back when the streams end."""

from __future__ import annotations

import asyncio
import io
import os
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import aiohttp
import av
import openai
import pytest

from gateway.audio.workers import AudioWorkers
from gateway.config import parse_config
from gateway.errors import ServiceUnavailableError
from gateway.state import AUDIO_WORKERS
from tests.adapters.common import serve
from tests.conftest import DEMO_KEY, Gateway, ServerThread, engine_config, sdk, sha
from tests.fakes.openai_engine import FakeOpenAIEngine, synth
from tests.fakes.wyoming_engine import MULTI_VOICE, FakeWyomingEngine
from tests.support import check_error, expect_error, wait_for
from tests.test_config import KINDS, VALID, problems

WORKERS, QUEUE = 4, 60
STREAMS = WORKERS + QUEUE
THREAD_SLACK = 4
"""Threads the process may start during the burst besides the pool's (none are expected)."""


@pytest.fixture
def piper(servers: ServerThread) -> Iterator[FakeWyomingEngine]:
    engine = FakeWyomingEngine(("tts",))
    engine.chunk_delay = 0.25  # 0.72 s of audio in 16 chunks lasts 4 s: the whole burst is in flight at once
    yield from serve(servers, engine)


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], tmp_path: Path, piper: FakeWyomingEngine) -> Gateway:
    return make_gateway(textwrap.dedent(f"""
        server:
          spool_dir: {tmp_path / "spool"}
          audio_workers: {WORKERS}
          audio_queue: {QUEUE}
          max_connections: 200
        keys:
          - {{name: demo, tenant: acme, sha256: "{sha(DEMO_KEY)}"}}
        backends:
          piper: {{kind: wyoming, url: "{piper.url}", timeout_s: 5, connect_timeout_s: 1}}
        models:
          tts-1: {{task: speech, routes: [{{backend: piper, model: piper}}]}}
        voices:
          nova: {{piper: {{name: {MULTI_VOICE}, speaker: p456}}}}
    """))


def audio_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("audio-worker")]


async def burst(gateway: Gateway) -> tuple[int, int, tuple[int, Mapping[str, str], bytes], list[bytes]]:
    """STREAMS mp3 streams from a PCM engine, all started; then one more. Returns the thread count
    before and with the burst in flight, the extra request's answer, and every stream's bytes."""
    body = {"model": "tts-1", "voice": "nova", "input": "Hello there.",
            "response_format": "mp3"}
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    before = threading.active_count()
    limits = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=60)) as http:
        responses = await asyncio.gather(*(http.post(f"{gateway.base_url}/audio/speech", json=body, headers=headers)
                                           for _ in range(STREAMS)))
        firsts = await asyncio.gather(*(r.content.readany() for r in responses))
        assert [r.status for r in responses] == [200] * STREAMS and all(firsts)
        during = threading.active_count()
        async with http.post(f"{gateway.base_url}/audio/speech", json=body, headers=headers) as extra:
            refused = (extra.status, extra.headers.copy(), await extra.read())
        rests = await asyncio.gather(*(r.read() for r in responses))
    return before, during, refused, [first + rest for first, rest in zip(firsts, rests, strict=True)]


def test_a_burst_of_transcoded_streams_runs_on_the_pool_and_the_next_one_gets_503(
        servers: ServerThread, gateway: Gateway) -> None:
    workers = gateway.app[AUDIO_WORKERS]
    assert len(audio_threads()) >= WORKERS  # started with the app, not per stream
    before, during, (status, headers, body), streams = asyncio.run(burst(gateway))
    print(f"\nthreads before {before}, with {STREAMS} transcoded streams in flight {during}")
    assert during - before <= THREAD_SLACK, (before, during)
    check_error(status, headers, body, expected_status=503, type_="server_error", code="service_unavailable")
    assert headers.get("Retry-After") == "1"
    for audio in (streams[0], streams[-1]):
        with av.open(io.BytesIO(audio)) as container:
            assert container.format.name == "mp3" and container.duration and container.duration > 500_000
    wait_for(lambda: servers.call(lambda: workers.admitted) == 0, what="every stream to give its job back")


async def test_admission_is_bounded_by_workers_plus_queue() -> None:
    workers = AudioWorkers(1, 1)
    try:
        with workers.job(), workers.job():
            with pytest.raises(ServiceUnavailableError) as caught:
                workers.admit()
            assert caught.value.status == 503 and caught.value.retry_after == 1
        assert workers.admitted == 0
        with workers.job():  # slots come back
            assert await workers.run(threading.current_thread) in audio_threads()
    finally:
        await workers.aclose()


async def test_a_cancelled_finish_still_waits_for_the_task() -> None:
    workers = AudioWorkers(1, 0)
    started, release, ended = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        release.wait(5)
        ended.set()

    try:
        task = asyncio.create_task(workers.finish(slow))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # the caller stays until the task ends, so nothing it guards is reused under it
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ended.is_set()
    finally:
        await workers.aclose()


def test_a_transcription_past_the_queue_gets_503_before_the_engine_sees_it(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine,
        tmp_path: Path) -> None:
    gateway = make_gateway(engine_config(engine.url, tmp_path / "spool"))
    workers = gateway.app[AUDIO_WORKERS]
    taken = servers.call(lambda: [workers.admit() for _ in range(workers.size + workers.queue)])
    try:
        with sdk(gateway.base_url, timeout=20) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                # an MP3 is measured on the workers (a PCM WAV in memory is measured by its header, no slot)
                client.audio.transcriptions.create(model="whisper-1", file=("a.mp3", synth("mp3", 1.0), "audio/mpeg"))
        expect_error(caught.value, 503, "server_error", "service_unavailable")
        assert caught.value.response.headers["Retry-After"] == "1"
        assert not engine.requests
    finally:
        servers.call(lambda: [workers.release() for _ in taken])


def test_pool_size_and_queue_have_defaults_and_are_checked_by_path() -> None:
    server = parse_config(VALID, kinds=KINDS, environ={}).server
    assert (server.audio_workers, server.audio_queue) == ((os.cpu_count() or 1) + 2, 64)
    server = parse_config("server: {audio_workers: null, audio_queue: 0}\n" + VALID, kinds=KINDS, environ={}).server
    assert (server.audio_workers, server.audio_queue) == ((os.cpu_count() or 1) + 2, 0)
    found = problems("server: {audio_workers: 0, audio_queue: many}\n" + VALID)
    assert "server.audio_workers: expected a number >= 1, got 0" in found, found
    assert "server.audio_queue: expected a number >= 0.0, got 'many'" in found, found
