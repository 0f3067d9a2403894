"""The upload path (gateway/form.py, gateway/spool.py, handlers/transcribe.py): the backend call starts
while the upload is measured but gets its last bytes only once the measurement passed; a refused upload
aborts it (the engine never has a complete request); uploads past the in-memory bound go to disk; an
unauthorized upload is answered before its body is read and costs no measurement; a WAV is billed by the
bytes it holds, whatever its data size field says."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import openai
import pytest

from gateway.state import AUDIO_WORKERS, SPOOL_MEMORY
from tests.conftest import DEMO_KEY, Gateway, ServerThread, engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine, synth
from tests.metering_support import scrape_settled, total
from tests.process import GatewayProcess
from tests.raw_http import connect, read_response
from tests.support import assert_settled, expect_error, spool_fds, wait_for
from tests.test_audio_bombs import peak_rss_kib, wav

MP3 = synth("mp3", 2.0)  # not a WAV, so measured on the audio workers (by FFmpeg's demuxer)


@pytest.fixture
def one_worker(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path) -> Gateway:
    return make_gateway(engine_config(engine.url, tmp_path / "spool").replace(
        "spool_memory_bytes: 65536", "spool_memory_bytes: 65536\n  audio_workers: 1"))


@pytest.fixture
def held_workers(servers: ServerThread, one_worker: Gateway) -> Iterator[threading.Event]:
    """The gateway's one audio worker busy until the test sets the event: a measurement waits meanwhile."""
    release = threading.Event()
    busy = asyncio.run_coroutine_threadsafe(one_worker.app[AUDIO_WORKERS].run(release.wait), servers.loop)
    yield release
    release.set()
    busy.result(5)


def _while_measuring(gateway: Gateway, engine: FakeOpenAIEngine, release: threading.Event,
                     audio: bytes) -> Callable[[], object]:
    """Send `audio`; once the engine has the request's head, check for a while that it never gets the whole
    body while the measurement waits; then let the measurement run. Returns the client's result."""
    pool = ThreadPoolExecutor(1)
    client = sdk(gateway)
    pending = pool.submit(client.audio.transcriptions.create, model="whisper-1",
                          file=("a.mp3", audio, "audio/mpeg"))
    try:
        wait_for(lambda: engine.started == 1, timeout=10, what=f"the backend call to start ({engine.started})")
        time.sleep(0.3)  # ample for ~32 KB to arrive, were the last bytes not held back
        assert engine.requests == [] and not pending.done()
    finally:
        release.set()

    def result() -> object:
        try:
            return pending.result(20)
        finally:
            client.close()
            pool.shutdown()
    return result


def test_the_backend_call_overlaps_the_measurement_and_ends_after_it(servers: ServerThread, one_worker: Gateway,
                                                                    engine: FakeOpenAIEngine,
                                                                    held_workers: threading.Event) -> None:
    result = _while_measuring(one_worker, engine, held_workers, MP3)()
    assert isinstance(result, openai.types.audio.Transcription) and result.text
    (_, _, _, received), = engine.last.files
    assert received == MP3
    _, samples = scrape_settled(f"{one_worker.url}/metrics", 1)
    assert total(samples, "gateway_billable_audio_seconds_total", model="whisper-1") == pytest.approx(2.0, abs=0.1)


def test_an_undecodable_upload_aborts_the_backend_call_before_its_last_bytes(servers: ServerThread,
                                                                           one_worker: Gateway,
                                                                           engine: FakeOpenAIEngine,
                                                                           held_workers: threading.Event) -> None:
    junk = b"\x00not audio at all" * 3000  # under spool_memory_bytes: a disk spool would wait for the worker too
    result = _while_measuring(one_worker, engine, held_workers, junk)
    with pytest.raises(openai.BadRequestError) as caught:
        result()
    expect_error(caught.value, 400, "invalid_request_error", "invalid_value", "file", message="could not be decoded")
    assert_settled(servers, one_worker, engine)  # the aborted call's connection is gone, the spool closed
    assert engine.started == 1 and engine.requests == []  # started, and never had a complete request
    _, samples = scrape_settled(f"{one_worker.url}/metrics", 1)
    assert total(samples, "gateway_billable_audio_seconds_total") == 0


def test_a_wav_claiming_less_data_than_it_holds_is_billed_by_what_it_holds(client: openai.OpenAI,
                                                                          gateway: Gateway) -> None:
    liar = wav(16_000, 10.0, claim=32_000)  # "1 second"
    client.audio.transcriptions.create(model="whisper-1", file=("a.wav", liar, "audio/wav"))
    _, samples = scrape_settled(f"{gateway.url}/metrics", 1)
    assert total(samples, "gateway_billable_audio_seconds_total", model="whisper-1") == pytest.approx(10.0)



async def post_upload(session: aiohttp.ClientSession, base_url: str, upload: bytes) -> None:
    """One transcription of `upload`, its answer read (or the wait cancelled)."""
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("file", upload, filename="a.wav", content_type="audio/wav")
    async with session.post(f"{base_url}/audio/transcriptions", data=form) as response:
        await response.read()


def test_uploads_past_the_memory_bound_are_spooled_to_disk(servers: ServerThread,
                                                           make_gateway: Callable[[str], Gateway],
                                                           engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gateway = make_gateway(engine_config(engine.url, tmp_path / "spool").replace(
        "spool_memory_bytes: 65536", "spool_memory_bytes: 1500000\n  spool_memory_uploads: 2").replace(
        "timeout_s: 2", "timeout_s: 60"))
    engine.mode = "hang"  # every upload stays held by the gateway until its client leaves
    upload = wav(16_000, 32.0)  # 1 MiB: under spool_memory_bytes
    memory = gateway.app[SPOOL_MEMORY]

    async def five_at_once() -> tuple[int, int]:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {DEMO_KEY}"}) as session:
            sending = [asyncio.ensure_future(post_upload(session, gateway.base_url, upload)) for _ in range(5)]
            for _ in range(1000):
                if len(engine.requests) == 5:
                    break
                await asyncio.sleep(0.02)
            held = (memory.held, len(spool_fds(gateway)))
            for task in sending:
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
            return held

    in_memory, on_disk = servers.run(five_at_once())
    assert len(engine.requests) == 5 and all(r.files[0][3] == upload for r in engine.requests)
    assert (in_memory, on_disk) == (2, 3)
    assert_settled(servers, gateway, engine, timeout=5)
    assert memory.held == 0


def test_an_unauthorized_upload_is_answered_before_its_body_and_never_measured(gateway: Gateway,
                                                                              engine: FakeOpenAIEngine) -> None:
    head = (f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: {25 * 1024 * 1024}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n").encode()
    for auth in ("", f"Authorization: Bearer {DEMO_KEY[:-1]}x\r\n"):
        with connect(gateway.port) as sock:
            sock.sendall(head.replace(b"\r\n\r\n", f"\r\n{auth}\r\n".encode(), 1) if auth else head)
            response = read_response(sock)  # no byte of the 25 MB sent
        assert response.status == 401
    assert gateway.app[AUDIO_WORKERS].jobs == 0 and engine.started == 0 and not spool_fds(gateway)


def _peak_rss_growth_kib(config: Path, engine: FakeOpenAIEngine, tmp_path: Path, uploads: int,
                         upload: bytes) -> int:
    """A gateway process's peak RSS growth while `uploads` copies of `upload` are all held at once."""
    gateway = GatewayProcess(config, tmp_path / f"{config.stem}.log")
    engine.requests.clear()
    try:
        async def held_at_once() -> int:
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {DEMO_KEY}"}) as session:
                await asyncio.wait_for(session.get(f"{gateway.url}/healthz"), 10)
                baseline = peak_rss_kib(gateway.proc.pid)
                sending = [asyncio.ensure_future(post_upload(session, f"{gateway.url}/v1", upload))
                           for _ in range(uploads)]
                for _ in range(1500):
                    if len(engine.requests) == uploads:
                        break
                    await asyncio.sleep(0.02)
                assert len(engine.requests) == uploads
                growth = peak_rss_kib(gateway.proc.pid) - baseline
                for task in sending:
                    task.cancel()
                await asyncio.gather(*sending, return_exceptions=True)
                return growth

        return asyncio.run(held_at_once())
    finally:
        gateway.stop()


def test_peak_rss_stays_within_the_memory_bound(engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    """16 uploads of 4 MiB held at once: with 2 of them allowed in memory the gateway grows by far less than
    with all of them in memory. (Either way each upload being received and sent costs about 1 MiB more of
    socket and parser buffers for a while, more under load: 16 uploads of 2 MiB going straight to disk grew it
    by 15-24 MiB.)"""
    engine.mode = "hang"
    upload = wav(16_000, 128.0)  # 4 MiB
    growth = {}
    for bound in (2, 64):
        config = tmp_path / f"bound{bound}.yaml"
        config.write_text(engine_config(engine.url, tmp_path).replace(
            "spool_memory_bytes: 65536",  # no background probes: they would count as engine requests
            f"spool_memory_bytes: 5000000\n  spool_memory_uploads: {bound}\n  probe_interval_s: 0").replace(
            "max_upload_bytes: 2000000", "max_upload_bytes: 26214400").replace("timeout_s: 2", "timeout_s: 60"))
        growth[bound] = _peak_rss_growth_kib(config, engine, tmp_path, 16, upload)
    said = (f"peak RSS growth with 16 x 4 MiB uploads held: {growth[2] / 1024:.1f} MiB with 2 in memory, "
            f"{growth[64] / 1024:.1f} MiB with all in memory")
    print("\n" + said)
    assert growth[64] > 56 * 1024, said  # the uploads themselves, so the figure measures what it should
    assert growth[2] < growth[64] - 24 * 1024, said
