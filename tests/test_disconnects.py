"""Clients that go away halfway: the engine call is cancelled, spool files closed, no task left behind."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import DEMO_KEY, Gateway, ServerThread
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import WAV, acquired_connections, assert_settled, loop_tasks, spool_fds

AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}
LONG_TEXT = "This sentence is spoken slowly, one small chunk at a time. " * 4


async def _settle(servers: ServerThread, gateway: Gateway, engine: FakeOpenAIEngine, before: set[Any]) -> None:
    """Wait (off this loop) until the gateway is idle again and the servers' loop has only its old tasks."""
    await asyncio.to_thread(assert_settled, servers, gateway, engine)
    for _ in range(100):
        extra = loop_tasks(servers) - before
        if not extra:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"tasks left in the servers' loop: {extra}")


async def _wait(predicate: Any, what: str, seconds: float = 2.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("stream_format", ["audio", "sse"])
async def test_client_leaving_a_speech_stream_cancels_the_engine(servers: ServerThread, gateway: Gateway,
                                                                 engine: FakeOpenAIEngine, stream_format: str) -> None:
    engine.chunk_size, engine.chunk_delay = 4096, 0.05  # ~11 s of pcm: ~140 chunks, ~7 s to send
    before = loop_tasks(servers)
    body = {"model": "tts-1", "voice": "nova", "input": LONG_TEXT, "response_format": "pcm",
            "stream_format": stream_format}
    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.base_url + "/audio/speech", json=body, headers=AUTH)
        assert response.status == 200
        received = 0
        while received < 3 * 4096:
            received += len(await response.content.readany())
        assert engine.active == 1
        assert acquired_connections(servers, gateway) == 1
        response.close()  # drop the connection mid-stream
    await _wait(lambda: engine.cancelled == 1, "the engine's handler to be cancelled")
    assert engine.active == 0
    await _settle(servers, gateway, engine, before)
    assert len(engine.requests) == 1


async def test_client_leaving_a_transcription_stream_cancels_the_engine(servers: ServerThread, gateway: Gateway,
                                                                        engine: FakeOpenAIEngine) -> None:
    engine.transcript_text = " ".join(f"word{i}" for i in range(80))
    engine.chunk_delay = 0.05  # 80 events, ~4 s
    before = loop_tasks(servers)
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("stream", "true")
    form.add_field("file", WAV, filename="a.wav", content_type="audio/wav")
    async with aiohttp.ClientSession() as session:
        response = await session.post(gateway.base_url + "/audio/transcriptions", data=form, headers=AUTH)
        assert response.status == 200
        assert (await response.content.readline()).startswith(b"data: ")
        assert engine.active == 1
        response.close()
    await _wait(lambda: engine.cancelled == 1, "the engine's handler to be cancelled")
    await _settle(servers, gateway, engine, before)


async def test_client_leaving_while_the_engine_transcribes(servers: ServerThread, gateway: Gateway,
                                                           engine: FakeOpenAIEngine) -> None:
    """Gone before any answer: the engine call is abandoned and the spooled upload closed."""
    engine.mode = "hang"
    before = loop_tasks(servers)
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("file", WAV + b"\0" * 300_000, filename="a.wav", content_type="audio/wav")
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(session.post(gateway.base_url + "/audio/transcriptions", data=form,
                                                  headers=AUTH))
        await _wait(lambda: engine.active == 1, "the engine to receive the upload")
        assert spool_fds(gateway)  # the upload is spooled to disk while the engine works
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await _wait(lambda: engine.cancelled == 1, "the engine's handler to be cancelled")
    await _settle(servers, gateway, engine, before)


async def test_client_leaving_halfway_through_an_upload(servers: ServerThread, gateway: Gateway,
                                                        engine: FakeOpenAIEngine) -> None:
    before = loop_tasks(servers)
    boundary = "slowslow"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {DEMO_KEY}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 1500000\r\n\r\n"
                  ).encode() + head)
    for _ in range(6):  # 300 kB, slowly: past spool_memory_bytes, so the spool is a real temp file
        writer.write(b"\x01" * 50_000)
        await writer.drain()
        await asyncio.sleep(0.05)
    await _wait(lambda: bool(spool_fds(gateway)), "the upload to be spooled to disk")
    writer.transport.abort()  # the client is gone, 1.2 MB short
    await _wait(lambda: not spool_fds(gateway), "the spool file to be closed")
    await _settle(servers, gateway, engine, before)
    assert engine.requests == []
    del reader


async def test_client_leaving_a_chunked_upload(servers: ServerThread, gateway: Gateway,
                                               engine: FakeOpenAIEngine) -> None:
    """The same without Content-Length: the body is chunked and simply stops."""
    before = loop_tasks(servers)
    boundary = "chunkgone"
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {DEMO_KEY}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n"
                  ).encode())

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    writer.write(chunk((f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
                        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                        "Content-Type: audio/wav\r\n\r\n").encode()))
    for _ in range(6):
        writer.write(chunk(b"\x02" * 50_000))
        await writer.drain()
        await asyncio.sleep(0.05)
    await _wait(lambda: bool(spool_fds(gateway)), "the upload to be spooled to disk")
    writer.close()
    await _wait(lambda: not spool_fds(gateway), "the spool file to be closed")
    await _settle(servers, gateway, engine, before)
    assert engine.requests == []
    del reader
