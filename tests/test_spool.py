"""The spooled upload (gateway/spool.py): every reader (failover attempt, decoder) has a position of
its own, and writes to the spool once it is on disk run on the audio workers, not the event loop."""

from __future__ import annotations

import io
import math
import struct
import tempfile
import threading
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.audio.workers import AudioWorkers
from gateway.spool import Upload
from tests.conftest import Gateway, ServerThread, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import table_config


def tone_wav(seconds: float, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack(f"<{int(seconds * rate)}h", *(int(8000 * math.sin(i / 7))
                                                                 for i in range(int(seconds * rate)))))
    return buffer.getvalue()


class _ThreadNoting(io.BytesIO):
    """A spool file that notes the thread each write ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: list[str] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writers.append(threading.current_thread().name)
        return super().write(data)


async def test_each_view_reads_the_whole_file_from_its_own_offset() -> None:
    workers = AudioWorkers(1, 0)
    data = bytes(range(256)) * 1000
    upload = Upload("a.wav", "audio/wav", tempfile.SpooledTemporaryFile(max_size=1024), workers,  # type: ignore[arg-type]
                    memory_bytes=1024)
    try:
        for start in range(0, len(data), 65_536):
            await upload.write(data[start:start + 65_536])
        first = upload.view()
        head = first.read(70_000)  # an earlier attempt, stopped midway
        second = upload.view()
        assert second.read(1000) == data[:1000]
        assert first.read() == data[70_000:] and head == data[:70_000]  # unmoved by the second view
        assert second.read() == data[1000:]
        assert second.seek(0, 2) == len(data) and upload.size == len(data)
    finally:
        upload.close()
        await workers.aclose()


async def test_writes_past_the_memory_threshold_run_on_the_workers() -> None:
    workers = AudioWorkers(1, 0)
    file = _ThreadNoting()
    upload = Upload("a.wav", "audio/wav", file, workers, memory_bytes=100_000)
    try:
        for _ in range(4):
            await upload.write(b"x" * 40_000)
        loop_thread = threading.current_thread().name
        assert file.writers[:2] == [loop_thread, loop_thread]  # in memory: a copy, cheaper than a hand-off
        assert all(name.startswith("audio-worker") for name in file.writers[2:])  # the rollover, then disk
        assert upload.size == 160_000 and file.getvalue() == b"x" * 160_000
    finally:
        await workers.aclose()


FAILED: list[str] = []


@pytest.fixture
def early_failure(servers: ServerThread) -> Iterator[str]:
    """A backend that answers 502 at once, before reading the upload (a proxy in front of a dead engine)."""
    async def fail(request: web.Request) -> web.Response:
        FAILED.append(request.path)
        return web.json_response({"error": {"message": "no healthy upstream"}}, status=502)

    app = web.Application()
    app.router.add_post("/v1/audio/transcriptions", fail)
    runner = web.AppRunner(app)

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"  # type: ignore[union-attr]

    yield servers.run(start())
    servers.run(runner.cleanup())


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, early_failure: str,
            tmp_path: Path) -> Gateway:
    return make_gateway(table_config({"first": early_failure, "second": engine.url},
                                     {"whisper-1": ("transcription", [("first", "w"), ("second", "w")])},
                                     tmp_path / "spool"))


def test_a_failover_attempt_gets_the_whole_upload(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    upload = tone_wav(30)  # ~1 MB: past spool_memory_bytes, so spooled to disk
    FAILED.clear()
    with sdk(gateway.base_url, timeout=20) as client:
        result = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", upload, "audio/wav"))
    assert result.text and FAILED == ["/v1/audio/transcriptions"]  # the first route was tried, and failed
    (name, filename, _, received), = engine.requests[-1].files
    assert (name, filename) == ("file", "a.wav")
    assert received == upload
