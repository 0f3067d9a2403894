"""Realtime transcription (`/v1/realtime?intent=transcription`) driven by the official SDK's realtime client
(`openai[realtime]`) against the gateway, with an OpenAI-compatible file engine behind (the emulation path):
OpenAI's events in OpenAI's order, server VAD turns as items, manual commits, refusals as OpenAI makes them."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import DEMO_KEY, Gateway, engine_config
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import wait_ledger
from tests.tones import tone

RATE = 24_000
TEXT = "The quick brown fox jumps over the lazy dog."
UPDATE = {"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1", "language": "en"}}}}


def quiet(seconds: float) -> bytes:
    return bytes(2 * int(seconds * RATE))


def chunks(pcm: bytes, ms: int = 100) -> list[str]:
    step = 2 * RATE * ms // 1000
    return [base64.b64encode(pcm[i:i + step]).decode() for i in range(0, len(pcm), step)]


@pytest.fixture
def gw(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path) -> Gateway:
    ledger = tmp_path / "usage.jsonl"
    return make_gateway(engine_config(engine.url, tmp_path / "spool",
                                      extra=f"ledger: {{sink: file, path: {ledger}}}\n"))


def aclient(gw: Gateway, key: str = DEMO_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


async def until(conn: Any, kind: str, within: float = 10) -> list[Any]:
    """Every event up to and including the first of type `kind` (within `within` seconds)."""
    seen: list[Any] = []
    async with asyncio.timeout(within):
        while True:
            seen.append(await conn.recv())
            if seen[-1].type == kind:
                return seen


async def test_a_session_opens_with_openais_defaults_and_takes_an_update(gw: Gateway) -> None:
    async with aclient(gw) as client, client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        session = created.session.model_dump()
        assert session["type"] == "transcription" and session["id"].startswith("sess_")
        raw = json.loads(created.to_json())["session"]
        assert raw["object"] == "realtime.transcription_session"
        assert raw["audio"]["input"] == {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": None,
                                         "noise_reduction": None, "turn_detection": {
                                             "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                             "silence_duration_ms": 200}}
        await conn.session.update(session=UPDATE)
        updated = json.loads((await conn.recv()).to_json())
        assert updated["type"] == "session.updated"
        assert updated["session"]["audio"]["input"]["transcription"] == {"model": "whisper-1", "language": "en",
                                                                         "prompt": None}


async def test_server_vad_makes_each_turn_an_item_transcribed_and_billed(gw: Gateway, engine: FakeOpenAIEngine,
                                                                         tmp_path: Path) -> None:
    turns = [(0.6, 1.5), (0.8, 2.0)]  # (silence before, speech) seconds
    pcm = b"".join(quiet(before) + tone(speech, RATE) for before, speech in turns) + quiet(1.0)
    async with aclient(gw) as client, client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.recv()
        await conn.session.update(session=UPDATE)
        await until(conn, "session.updated")
        for piece in chunks(pcm):
            await conn.input_audio_buffer.append(audio=piece)
        events = await until(conn, "conversation.item.input_audio_transcription.completed")
        events += await until(conn, "conversation.item.input_audio_transcription.completed")
    kinds = [e.type for e in events]
    assert kinds.count("input_audio_buffer.speech_started") == 2
    starts = [e for e in events if e.type == "input_audio_buffer.speech_started"]
    stops = [e for e in events if e.type == "input_audio_buffer.speech_stopped"]
    assert [s.item_id for s in starts] == [s.item_id for s in stops]
    assert abs(starts[0].audio_start_ms - (600 - 300)) <= 100  # the turn's start minus the prefix padding
    assert abs(starts[1].audio_start_ms - (600 + 1500 + 800 - 300)) <= 100
    assert 0 <= stops[0].audio_end_ms - (600 + 1500 + 200) <= 200  # its end, the silence that ended it, the hangover
    done = [e for e in events if e.type == "conversation.item.input_audio_transcription.completed"]
    assert [d.item_id for d in done] == [s.item_id for s in starts]
    assert all(d.transcript == TEXT for d in done)
    committed = [e for e in events if e.type == "input_audio_buffer.committed"]
    assert committed[0].previous_item_id is None and committed[1].previous_item_id == committed[0].item_id
    for item in (s.item_id for s in starts):  # per item: committed, added, done, then its text
        order = [e.type for e in events if getattr(e, "item_id", None) == item
                 or getattr(getattr(e, "item", None), "id", None) == item]
        assert order == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
                         "conversation.item.input_audio_transcription.delta",
                         "conversation.item.input_audio_transcription.completed"], order
    sent = [r for r in engine.requests if r.path == "/v1/audio/transcriptions"]
    assert len(sent) == 2 and all(r.form_value("language") == "en" for r in sent)
    records = wait_ledger(tmp_path / "usage.jsonl", 2)
    assert {r["item"] for r in records} == {s.item_id for s in starts}
    assert all(r["endpoint"] == "/v1/realtime" and r["billable"] for r in records)
    for record, usage in zip(records, (d.usage for d in done), strict=True):
        assert usage.type == "duration" and usage.seconds >= record["audio_seconds"] > 1.5


async def test_manual_commits_and_their_refusals(gw: Gateway) -> None:
    async with aclient(gw) as client, client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.recv()
        await conn.session.update(session={**UPDATE, "audio": {"input": {**UPDATE["audio"]["input"],
                                                                          "turn_detection": None}}})
        await until(conn, "session.updated")
        await conn.input_audio_buffer.commit(event_id="commit_1")
        refused = await until(conn, "error")
        assert refused[-1].error.code == "input_audio_buffer_commit_empty"
        assert refused[-1].error.event_id == "commit_1"
        for piece in chunks(tone(1.0, RATE)):
            await conn.input_audio_buffer.append(audio=piece)
        await conn.input_audio_buffer.commit()
        events = await until(conn, "conversation.item.input_audio_transcription.completed")
        assert [e.type for e in events][:3] == ["input_audio_buffer.committed", "conversation.item.added",
                                                "conversation.item.done"]
        assert events[-1].transcript == TEXT and events[-1].usage.seconds == 1
        await conn.input_audio_buffer.append(audio=chunks(tone(0.5, RATE))[0])
        await conn.input_audio_buffer.clear()
        assert (await until(conn, "input_audio_buffer.cleared"))[-1].type == "input_audio_buffer.cleared"
        await conn.input_audio_buffer.commit()
        assert (await until(conn, "error"))[-1].error.code == "input_audio_buffer_commit_empty"


async def test_a_bad_key_is_an_error_event_then_close_3000(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{gw.url}/v1/realtime?intent=transcription", headers={"Authorization": "Bearer sk-wrong"}) as ws:
        first = await ws.receive_json(timeout=5)
        closing = await ws.receive(timeout=5)
    assert first["type"] == "error" and first["error"]["code"] == "invalid_api_key"
    assert "sk-wrong" not in json.dumps(first)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 3000
    assert closing.extra == "invalid_request_error.invalid_api_key"


@pytest.mark.parametrize("frame, code, param", [
    ("not json", "invalid_json", None),
    ('{"type": "bogus"}', "invalid_value", "type"),
    ('{"type": "response.create"}', "invalid_value", "type"),
    ('{"type": "input_audio_buffer.append", "audio": "@@@"}', "invalid_value", "audio"),
    ('{"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"format": '
     '{"type": "audio/pcm", "rate": 16000}}}}}', "integer_below_min_value", "session.audio.input.format.rate"),
    ('{"type": "session.update", "session": {"type": "transcription", "bogus_field": 1}}', "unknown_parameter",
     "session.bogus_field"),
    ('{"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"transcription": '
     '{"model": "no-such-model"}}}}}', "model_not_found", "session.audio.input.transcription.model"),
    ('{"type": "session.update", "session": {"type": "transcription", "audio": {"input": {"turn_detection": '
     '{"type": "server_vad", "threshold": NaN}}}}}', "invalid_type", "session.audio.input.turn_detection.threshold"),
])
async def test_bad_events_are_error_events_and_the_session_goes_on(gw: Gateway, frame: str, code: str,
                                                                   param: str | None) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(
            f"{gw.url}/v1/realtime?intent=transcription", headers={"Authorization": f"Bearer {DEMO_KEY}"}) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "session.created"
        await ws.send_str(frame)
        got = await ws.receive_json(timeout=5)
        assert got["type"] == "error", got
        assert (got["error"]["code"], got["error"]["param"]) == (code, param), got
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive_json(timeout=5))["error"]["code"] == "invalid_event"
        await ws.send_str('{"type": "input_audio_buffer.clear"}')
        assert (await ws.receive_json(timeout=5))["type"] == "input_audio_buffer.cleared"
