"""Snapshots share adapters: a reload keeps the adapter (and the loaded model) of every backend whose
settings did not change, and an adapter is closed only once no snapshot still serving a request
holds it. Driven in-process, through gateway.reload's API, on real PocketSphinx adapters."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.adapters import ADAPTERS, unavailable_reason
from gateway.adapters.base import Adapter
from gateway.app import build_app
from gateway.config import load_config
from gateway.state import RELOADER, TABLES
from gateway.table import TableHolder
from tests.conftest import Gateway, ServerThread, engine_config, sdk, serve_app
from tests.fakes.openai_engine import FakeOpenAIEngine, speech_seconds
from tests.support import wait_for, wav_bytes

pytestmark = pytest.mark.skipif(bool(unavailable_reason("pocketsphinx")),
                                reason="the embedded engines are not installed")

SPHINX = "  sphinx: {kind: pocketsphinx}\n"
SPHINX_TUNED = "  sphinx: {kind: pocketsphinx, decoder: {beam: 1.0e-40}}\n"
LOCAL = "  local-1: {task: transcription, routes: [{backend: sphinx, model: en-us}]}\n"


class Edits:
    """The config file of an in-process gateway: the test table plus a PocketSphinx backend."""

    def __init__(self, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
        self.base = engine_config(engine.url, tmp_path / "spool").replace("server:\n",
                                                                          "server:\n  reload_interval_s: 0\n")
        self.path = tmp_path / "gateway.yaml"

    def write(self, sphinx: str = SPHINX, timeout_s: int = 2) -> None:
        self.path.write_text(self.base.replace("backends:\n", "backends:\n" + sphinx)
                             .replace("models:\n", "models:\n" + LOCAL)
                             .replace("timeout_s: 2", f"timeout_s: {timeout_s}"))


async def start(path: Path) -> Gateway:
    config = load_config(path, kinds=ADAPTERS.keys())
    return await serve_app(build_app(config), config, path.parent)


@pytest.fixture
def edits(engine: FakeOpenAIEngine, tmp_path: Path) -> Edits:
    (tmp_path / "spool").mkdir()
    found = Edits(engine, tmp_path)
    found.write()
    return found


@pytest.fixture
def gw(servers: ServerThread, edits: Edits) -> Iterator[Gateway]:
    started = servers.run(start(edits.path))
    yield started
    servers.run(started.runner.cleanup())


def reload(servers: ServerThread, gw: Gateway) -> bool | None:
    return servers.run(gw.app[RELOADER].reload("test"))


def adapters(servers: ServerThread, gw: Gateway) -> dict[str, Adapter]:
    tables: TableHolder = gw.app[TABLES]
    return dict(servers.call(lambda: tables.current.adapters))


def is_open(servers: ServerThread, adapter: Adapter) -> Callable[[], bool]:
    return lambda: servers.run(adapter.ready())


def transcribe(gw: Gateway) -> str:
    with sdk(gw.base_url, timeout=20) as client:
        return client.audio.transcriptions.create(model="local-1", file=("a.wav", wav_bytes(bytes(32_000)))).text


def test_an_unchanged_backend_keeps_its_adapter_and_model(servers: ServerThread, gw: Gateway, edits: Edits) -> None:
    before = adapters(servers, gw)
    transcribe(gw)
    edits.write(timeout_s=3)  # only the openai backend changes
    assert reload(servers, gw) is True
    after = adapters(servers, gw)
    assert after["sphinx"] is before["sphinx"]  # same adapter, same loaded Decoder, same worker thread
    assert after["speaches"] is not before["speaches"]
    assert transcribe(gw) == ""  # the kept adapter was not closed with the replaced snapshot
    assert is_open(servers, before["sphinx"])()
    edits.write(sphinx=SPHINX_TUNED, timeout_s=3)  # now the PocketSphinx backend changes
    assert reload(servers, gw) is True
    assert adapters(servers, gw)["sphinx"] is not before["sphinx"]
    wait_for(lambda: not is_open(servers, before["sphinx"])(), what="the replaced adapter closed")
    assert transcribe(gw) == ""


def test_an_adapter_is_closed_only_when_no_snapshot_serving_a_request_holds_it(
        servers: ServerThread, gw: Gateway, edits: Edits, engine: FakeOpenAIEngine) -> None:
    """Snapshot 1 serves a slow stream; snapshot 2 shares its PocketSphinx adapter; snapshot 3 replaces
    it. Snapshot 2 dies at once, but the adapter lives on until snapshot 1's stream has finished."""
    sphinx = adapters(servers, gw)["sphinx"]
    engine.chunk_size, engine.chunk_delay = 4096, 0.05
    text = "A stream that outlives two reloads. " * 2
    got: dict[str, int] = {}

    def stream() -> None:
        with sdk(gw.base_url, timeout=20) as client:
            got["bytes"] = len(client.audio.speech.create(model="tts-1", voice="nova", input=text,
                                                          response_format="pcm").content)

    tables: TableHolder = gw.app[TABLES]
    worker = threading.Thread(target=stream)
    worker.start()
    wait_for(lambda: servers.call(lambda: tables.in_flight) == 1, what="the stream in flight")
    edits.write(timeout_s=3)
    assert reload(servers, gw) is True
    assert adapters(servers, gw)["sphinx"] is sphinx
    edits.write(sphinx=SPHINX_TUNED, timeout_s=3)
    assert reload(servers, gw) is True
    assert adapters(servers, gw)["sphinx"] is not sphinx
    assert worker.is_alive(), "the stream ended before the reloads: nothing was pinned"
    assert is_open(servers, sphinx)(), "closed while snapshot 1 still serves a request"
    worker.join(20)
    assert got["bytes"] == int(speech_seconds(text) * 24_000) * 2
    wait_for(lambda: not is_open(servers, sphinx)(), what="the adapter closed after the last request")
