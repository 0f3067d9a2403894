"""SIGTERM on a real gateway process: readiness fails at once, in-flight work finishes (a realtime session's committed
item too, then its close 1001), then exit 0."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx2 as httpx
import pytest

from tests.conftest import DEMO_KEY, LOOPBACK_TLS, ServerThread, engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine, speech_seconds
from tests.process import GatewayProcess
from tests.support import WAV

DRAIN_DELAY, GRACE = 0.5, 15.0


@pytest.fixture
def process(engine: FakeOpenAIEngine, tmp_path: Path) -> Iterator[GatewayProcess]:
    spool = tmp_path / "spool"
    spool.mkdir()
    config = engine_config(engine.url, spool).replace(
        "server:\n", f"server:\n  drain_delay_s: {DRAIN_DELAY}\n  grace_s: {GRACE}\n", 1).replace(
        "timeout_s: 2\n", "timeout_s: 20\n")
    path = tmp_path / "gateway.yaml"
    path.write_text(config)
    gw = GatewayProcess(path, tmp_path / "gateway.log")
    yield gw
    gw.stop()


def slow_upload(url: str, seconds: float) -> Iterator[bytes]:
    """A multipart body that takes `seconds` to send: the file part trickles in."""
    yield (b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
           b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n')
    pieces = 10
    step = len(WAV) // pieces + 1
    for i in range(pieces):
        time.sleep(seconds / pieces)
        yield WAV[i * step:(i + 1) * step]
    yield b"\r\n--B--\r\n"


def test_sigterm_drains_then_exits_zero(process: GatewayProcess, engine: FakeOpenAIEngine,
                                        servers: ServerThread) -> None:
    text = "A long sentence to stream slowly. " * 3
    engine.chunk_size, engine.chunk_delay = 4096, 0.06  # ~12 s of pcm takes ~2 s to stream
    expected = int(speech_seconds(text) * 24_000) * 2
    results: dict[str, object] = {}

    def stream() -> None:
        with sdk(f"{process.url}/v1") as client, \
                client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="nova", input=text, response_format="pcm") as response:
            results["stream"] = len(b"".join(response.iter_bytes()))

    def upload() -> None:
        response = httpx.post(f"{process.url}/v1/audio/transcriptions", content=slow_upload(process.url, 2.0),
                              headers={"Authorization": f"Bearer {DEMO_KEY}",
                                       "Content-Type": "multipart/form-data; boundary=B"},
                              timeout=30, verify=LOOPBACK_TLS)
        results["upload"] = (response.status_code, response.json())

    workers = [threading.Thread(target=stream), threading.Thread(target=upload)]
    for w in workers:
        w.start()
    time.sleep(0.5)  # both requests are in flight
    assert engine.active >= 1
    process.signal(signal.SIGTERM)
    sent = time.monotonic()
    time.sleep(0.2)
    readyz = httpx.get(f"{process.url}/readyz", verify=LOOPBACK_TLS)
    assert readyz.status_code == 503  # at once; still accepting for now
    time.sleep(DRAIN_DELAY + 0.5)
    with pytest.raises(httpx.ConnectError):  # after the drain delay, new connections are refused
        httpx.get(f"{process.url}/healthz", timeout=2, verify=LOOPBACK_TLS)
    for w in workers:
        w.join(GRACE)
    assert results["stream"] == expected  # the stream finished intact
    assert results["upload"] == (200, {"text": engine.transcript_text})
    assert process.proc.wait(GRACE) == 0
    assert time.monotonic() - sent < DRAIN_DELAY + GRACE
    log = process.log()
    assert "draining" in log and "gateway stopped" in log


async def test_sigterm_lets_a_realtime_sessions_committed_item_finish_then_closes_it_1001(
        process: GatewayProcess, engine: FakeOpenAIEngine) -> None:
    engine.reply_delay = 1.0  # the item is still being transcribed when SIGTERM comes
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{process.url}/v1/realtime?intent=transcription", headers={"Authorization": f"Bearer {DEMO_KEY}"},
            ssl=False) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "session.created"
        await ws.send_json({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "transcription": {"model": "whisper-1"}, "turn_detection": None}}}})
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(9600)).decode()})
        await ws.send_json({"type": "input_audio_buffer.commit"})
        assert (await ws.receive_json(timeout=5))["type"] == "input_audio_buffer.committed"
        process.signal(signal.SIGTERM)
        kinds = []
        while (msg := await ws.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
            kinds.append(json.loads(msg.data)["type"])
        assert kinds[-1] == "conversation.item.input_audio_transcription.completed", kinds
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
    assert await asyncio.to_thread(process.proc.wait, GRACE) == 0
