"""Realtime sessions on engines that stream their own transcript (adapters' `transcribe_live`): Wyoming's
`transcript-chunk` and Deepgram's live `/v1/listen`, translated into OpenAI's deltas as they come, through the
official SDK's realtime client. Before a first delta reached the client an engine's failure fails over; after it,
the item fails and no other route repeats what was said."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.adapters.common import serve
from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, sha
from tests.fakes.deepgram_engine import FakeDeepgram
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.fakes.wyoming_engine import TRANSCRIPT, FakeWyomingEngine
from tests.support import probe_backends
from tests.test_realtime import aclient, opened, say, until

DG_TEXT = "Hello there. The quick brown fox jumps over the lazy dog."


@pytest.fixture
def wyoming(servers: ServerThread) -> Iterator[FakeWyomingEngine]:
    yield from serve(servers, FakeWyomingEngine(("asr",)))


@pytest.fixture
def deepgram(servers: ServerThread) -> Iterator[FakeDeepgram]:
    yield from serve(servers, FakeDeepgram(expected_api_key=ENGINE_KEY))


def config(spool: Path, first: str, fallback_url: str) -> str:
    return textwrap.dedent(f"""
        server: {{spool_dir: {spool}}}
        keys: [{{name: demo, tenant: acme, sha256: "{sha(DEMO_KEY)}"}}]
        backends:
          first: {first}
          spare: {{kind: openai, url: "{fallback_url}", api_key: "{ENGINE_KEY}", timeout_s: 2}}
        models:
          whisper-1: {{task: transcription, routes: [{{backend: first, model: nova-3}}, {{backend: spare, model: s}}]}}
        """)


async def one_item(gw: Gateway, seconds: float = 2.0) -> list[Any]:
    async with aclient(gw) as client, client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await opened(conn)
        await say(conn, seconds)
        events = await until(conn, "conversation.item.input_audio_transcription.completed")
    return events


def transcribed(engine: FakeOpenAIEngine) -> int:
    """Transcriptions the spare route was asked for (its readiness probes aside)."""
    return sum(1 for r in engine.requests if r.path.endswith("/transcriptions"))


def deltas(events: list[Any]) -> list[str]:
    return [e.delta for e in events if e.type == "conversation.item.input_audio_transcription.delta"]


async def test_wyoming_transcript_chunks_become_deltas(make_gateway: Callable[[str], Gateway], servers: ServerThread,
                                                       wyoming: FakeWyomingEngine, engine: FakeOpenAIEngine,
                                                       tmp_path: Path) -> None:
    wyoming.mode = "asr_streaming"
    gw = make_gateway(config(tmp_path, f'{{kind: wyoming, url: "{wyoming.url}", timeout_s: 2}}', engine.url))
    probe_backends(servers, gw)  # the server's `info` says it streams
    events = await one_item(gw)
    assert deltas(events) == ["Turn", " on", " the", " living", " room", " lamp."]
    assert events[-1].transcript == TRANSCRIPT and transcribed(engine) == 0


async def test_deepgram_live_results_become_deltas(make_gateway: Callable[[str], Gateway], deepgram: FakeDeepgram,
                                                   engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gw = make_gateway(config(tmp_path, f'{{kind: deepgram, url: "{deepgram.url}", api_key: "{ENGINE_KEY}", '
                                       'timeout_s: 2}', engine.url))
    events = await one_item(gw, 3.0)
    assert len(deltas(events)) >= 2 and "".join(deltas(events)) == events[-1].transcript
    assert events[-1].transcript.split() == DG_TEXT.split()
    assert len(deepgram.live) == 1 and transcribed(engine) == 0


@pytest.mark.parametrize(("after", "fails_over"), [(0, True), (2, False)])
async def test_a_stream_broken_before_its_first_delta_fails_over_and_after_it_fails_the_item(
        make_gateway: Callable[[str], Gateway], servers: ServerThread, wyoming: FakeWyomingEngine,
        engine: FakeOpenAIEngine, tmp_path: Path, after: int, fails_over: bool) -> None:
    wyoming.mode, wyoming.fail_after = "asr_streaming_error", after
    gw = make_gateway(config(tmp_path, f'{{kind: wyoming, url: "{wyoming.url}", timeout_s: 2}}', engine.url))
    probe_backends(servers, gw)
    async with aclient(gw) as client, client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await opened(conn)
        await say(conn, 2.0)
        kinds = ("conversation.item.input_audio_transcription.completed",
                 "conversation.item.input_audio_transcription.failed")
        events: list[Any] = []
        while not events or events[-1].type not in kinds:
            events.append(await conn.recv())
    said = deltas(events)
    if fails_over:
        assert events[-1].type == kinds[0] and said == ["The quick brown fox jumps over the lazy dog."]
        assert transcribed(engine) == 1
    else:
        assert events[-1].type == kinds[1] and said == ["Turn", " on"]  # what was said stands; nobody repeats it
        assert events[-1].error.type == "transcription_error" and transcribed(engine) == 0
