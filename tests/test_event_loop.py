"""`gateway serve` runs on uvloop when it is installed, on asyncio's loop with GATEWAY_EVENT_LOOP=asyncio,
and refuses to start on a value it does not know or on `uvloop` without uvloop (gateway/event_loop.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.process import GatewayProcess
from tests.support import WAV

ROOT = Path(__file__).parent.parent


@pytest.fixture
def start(engine: FakeOpenAIEngine, tmp_path: Path) -> Iterator[Callable[[], GatewayProcess]]:
    (tmp_path / "spool").mkdir()
    config = tmp_path / "gateway.yaml"
    config.write_text(engine_config(engine.url, tmp_path / "spool"))
    started: list[GatewayProcess] = []

    def run() -> GatewayProcess:
        started.append(GatewayProcess(config, tmp_path / f"gateway-{len(started)}.log"))
        return started[-1]

    yield run
    for process in started:
        process.stop()


def serves(process: GatewayProcess) -> None:
    """A speech stream and a transcription upload, both answered in full through the process."""
    with sdk(f"{process.url}/v1") as client:
        audio = client.audio.speech.create(model="tts-1", voice="nova", input="Hello there.", response_format="mp3")
        assert audio.content[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3")
        text = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"))
        assert text.text


def test_serves_on_uvloop_when_installed(start: Callable[[], GatewayProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop  # in the test extra: this test fails, not skips, without it
    monkeypatch.delenv("GATEWAY_EVENT_LOOP", raising=False)
    process = start()
    serves(process)
    assert f"event loop: uvloop {uvloop.__version__} (GATEWAY_EVENT_LOOP=auto)" in process.log()


def test_asyncio_when_turned_off(start: Callable[[], GatewayProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_EVENT_LOOP", "asyncio")
    process = start()
    serves(process)
    log = process.log()
    assert "event loop: asyncio (GATEWAY_EVENT_LOOP=asyncio)" in log
    assert "uvloop" not in log.replace("GATEWAY_EVENT_LOOP", "")


@pytest.mark.parametrize(("value", "expected"), [
    ("libuv", "GATEWAY_EVENT_LOOP='libuv': expected one of auto, uvloop, asyncio"),
    ("uvloop", "GATEWAY_EVENT_LOOP=uvloop, but uvloop is not installed (pip extra: fast)"),
])
def test_refuses_a_loop_it_cannot_have(value: str, expected: str, tmp_path: Path) -> None:
    """`uvloop` without uvloop: the import is made to fail by a module of that name that raises ImportError."""
    (tmp_path / "spool").mkdir()
    config = tmp_path / "gateway.yaml"
    config.write_text(engine_config("http://127.0.0.1:9", tmp_path / "spool"))
    (tmp_path / "uvloop.py").write_text("raise ImportError('hidden by the test')\n")
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", "9"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{ROOT}",
                               "GATEWAY_EVENT_LOOP": value})
    assert done.returncode == 1, done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
