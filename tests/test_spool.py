"""The spooled upload (gateway/spool.py): every reader (failover attempt, decoder) has a position of
its own, an upload moves to disk past `spool_memory_bytes` and is on disk from the start past
`spool_memory_uploads` held in memory, and a failover attempt gets the whole upload."""

from __future__ import annotations

import io
import math
import os
import struct
import threading
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.audio.workers import AudioWorkers
from gateway.config import parse_config
from gateway.spool import SpoolMemory, Upload
from tests.conftest import Gateway, ServerThread, open_fds_matching, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import table_config
from tests.test_config import KINDS, VALID, problems


def tone_wav(seconds: float, rate: int = 16_000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack(f"<{int(seconds * rate)}h", *(int(8000 * math.sin(i / 7))
                                                                 for i in range(int(seconds * rate)))))
    return buffer.getvalue()


async def _spooled(data: bytes, workers: AudioWorkers, memory: SpoolMemory, memory_bytes: int,
                   directory: Path) -> Upload:
    upload = Upload("a.wav", "audio/wav", workers, memory, memory_bytes, str(directory))
    for start in range(0, len(data), 65_536):
        await upload.write(data[start:start + 65_536])
    return upload


@pytest.mark.parametrize("memory_bytes", [10_000_000, 1024], ids=["memory", "disk"])
async def test_each_view_reads_the_whole_file_from_its_own_offset(tmp_path: Path, memory_bytes: int) -> None:
    workers = AudioWorkers(1, 0)
    data = bytes(range(256)) * 1000
    upload = await _spooled(data, workers, SpoolMemory(1), memory_bytes, tmp_path)
    try:
        assert upload.in_memory == (memory_bytes > len(data))
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


async def test_past_its_size_an_upload_moves_to_disk_and_gives_its_memory_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    workers, memory = AudioWorkers(1, 0), SpoolMemory(1)
    upload = Upload("a.wav", "audio/wav", workers, memory, 100_000, str(tmp_path))
    writers: list[str] = []
    write = os.write

    def noting(fd: int, data: Any) -> int:
        writers.append(threading.current_thread().name)
        return write(fd, data)

    monkeypatch.setattr(os, "write", noting)
    try:
        for i in range(2):
            await upload.write(bytes([i]) * 40_000)
        assert upload.in_memory and memory.held == 1 and not _files(tmp_path)
        for i in range(2, 4):
            await upload.write(bytes([i]) * 40_000)
            assert not upload.in_memory and memory.held == 0 and len(_files(tmp_path)) == 1
        assert upload.view().read() == b"".join(bytes([i]) * 40_000 for i in range(4))
        assert writers and all(name.startswith("audio-worker") for name in writers)  # never the event loop
    finally:
        upload.close()
        await workers.aclose()
    assert not _files(tmp_path)


async def test_past_the_memory_bound_uploads_go_to_disk_from_the_first_byte(tmp_path: Path) -> None:
    workers, memory = AudioWorkers(1, 0), SpoolMemory(2)
    uploads = [await _spooled(b"x" * 1000, workers, memory, 1_000_000, tmp_path) for _ in range(3)]
    try:
        assert [u.in_memory for u in uploads] == [True, True, False] and memory.held == 2
        assert len(_files(tmp_path)) == 1 and uploads[2].view().read() == b"x" * 1000
        uploads[0].close()
        assert memory.held == 1
        later = await _spooled(b"y" * 1000, workers, memory, 1_000_000, tmp_path)
        assert later.in_memory and memory.held == 2
        later.close()
    finally:
        for upload in uploads:
            upload.close()
        await workers.aclose()
    assert memory.held == 0


def _files(directory: Path) -> list[str]:
    """Spool files open in this process under `directory` (unnamed, so found by their descriptors)."""
    return open_fds_matching(f"{directory}/")


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
    upload = tone_wav(30)  # ~1 MB: past the tests' spool_memory_bytes, so spooled to disk
    FAILED.clear()
    with sdk(gateway.base_url, timeout=20) as client:
        result = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", upload, "audio/wav"))
    assert result.text and FAILED == ["/v1/audio/transcriptions"]  # the first route was tried, and failed
    (name, filename, _, received), = engine.requests[-1].files
    assert (name, filename) == ("file", "a.wav")
    assert received == upload


def test_memory_size_and_bound_have_defaults_and_are_checked_by_path() -> None:
    server = parse_config(VALID, kinds=KINDS, environ={}).server
    assert (server.spool_memory_bytes, server.spool_memory_uploads) == (4 * 1024 * 1024, 16)
    server = parse_config("server: {spool_memory_bytes: 0, spool_memory_uploads: 0}\n" + VALID, kinds=KINDS,
                          environ={}).server
    assert (server.spool_memory_bytes, server.spool_memory_uploads) == (0, 0)  # every upload on disk
    found = problems("server: {spool_memory_uploads: -1}\n" + VALID)
    assert "server.spool_memory_uploads: expected a number >= 0.0, got -1" in found, found
