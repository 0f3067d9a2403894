"""Realtime transcription (`/v1/realtime?intent=transcription`) driven by the official SDK's realtime client
(`openai[realtime]`) against the gateway, with an OpenAI-compatible file engine behind (the emulation path):
OpenAI's events in OpenAI's order, server VAD turns as items, manual commits, refusals as OpenAI makes them."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import websockets

from gateway.config import ConfigError, parse_config
from gateway.settings import Realtime
from gateway.state import DRAINING
from tests.conftest import BETA_KEY, DEMO_KEY, Gateway, engine_config
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import wait_ledger
from tests.tones import tone

RATE = 24_000
TEXT = "The quick brown fox jumps over the lazy dog."
UPDATE = {"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1", "language": "en"}}}}
MANUAL = {"type": "transcription", "audio": {"input": {**UPDATE["audio"]["input"], "turn_detection": None}}}
"""UPDATE with the client committing (no server VAD)."""


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


async def eventually(condition: Callable[[], bool], within: float = 5) -> None:
    for _ in range(int(within / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not within the time")


async def opened(conn: Any, session: dict[str, Any] = MANUAL) -> None:
    """Past `session.created`, with `session` in effect."""
    await conn.recv()
    await conn.session.update(session=session)
    await until(conn, "session.updated")


async def say(conn: Any, seconds: float, commits: int = 1) -> None:
    """`commits` items of a tone of `seconds`, each appended in 100 ms pieces and committed."""
    for _ in range(commits):
        for piece in chunks(tone(seconds, RATE)):
            await conn.input_audio_buffer.append(audio=piece)
        await conn.input_audio_buffer.commit()


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
        await opened(conn)
        await conn.input_audio_buffer.commit(event_id="commit_1")
        refused = await until(conn, "error")
        assert refused[-1].error.code == "input_audio_buffer_commit_empty"
        assert refused[-1].error.event_id == "commit_1"
        await say(conn, 1.0)
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


# -- raw frames: what the SDK would not send, and the refusals OpenAI makes after the upgrade --------------------

async def connect(gw: Gateway, query: str = "intent=transcription", *, key: str | None = DEMO_KEY,
                  headers: dict[str, str] | None = None, protocols: tuple[str, ...] = ()) -> tuple[Any, Any]:
    http = aiohttp.ClientSession()
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    ws = await http.ws_connect(f"{gw.url}/v1/realtime?{query}", headers={**auth, **(headers or {})},
                               protocols=protocols)
    return http, ws


async def refusal(gw: Gateway, query: str = "intent=transcription", **kw: Any) -> tuple[dict[str, Any], Any]:
    http, ws = await connect(gw, query, **kw)
    async with http, ws:
        first = await ws.receive_json(timeout=5)
        closing = await ws.receive(timeout=5)
    assert closing.type == aiohttp.WSMsgType.CLOSE
    return first, closing


@pytest.mark.parametrize("query, kw, close, reason", [
    ("intent=transcription", {"key": None}, 3000, "invalid_request_error"),
    ("intent=transcription", {"headers": {"OpenAI-Beta": "realtime=v1"}}, 4000,
     "invalid_request_error.beta_api_shape_disabled"),
    ("", {}, 4000, "invalid_request_error.missing_model"),
    ("model=gpt-realtime", {}, 4000, "invalid_request_error.unsupported_intent"),
    ("intent=transcription&model=no-such-model", {}, 4000, "invalid_request_error.model_not_found"),
])
async def test_refusals_come_after_the_upgrade_as_openai_makes_them(gw: Gateway, query: str, kw: dict[str, Any],
                                                                    close: int, reason: str) -> None:
    first, closing = await refusal(gw, query, **kw)
    assert first["type"] == "error" and first["error"]["type"] == "invalid_request_error"
    assert (closing.data, closing.extra) == (close, reason)


async def test_a_browser_authenticates_with_the_subprotocol_which_is_never_echoed(gw: Gateway) -> None:
    http, ws = await connect(gw, key=None, protocols=("realtime", f"openai-insecure-api-key.{DEMO_KEY}"))
    async with http, ws:
        assert ws.protocol == "realtime"
        assert (await ws.receive_json(timeout=5))["type"] == "session.created"


async def test_a_plain_get_is_an_openai_shaped_400(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/v1/realtime?intent=transcription",
                                                         headers={"Authorization": f"Bearer {DEMO_KEY}"}) as r:
        assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"


async def test_an_append_past_15_mib_and_a_full_buffer_are_refused(make_gateway: Callable[[str], Gateway],
                                                                   engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gw = make_gateway(engine_config(engine.url, tmp_path / "spool", extra="realtime: {max_buffer_s: 1}\n"))
    http, ws = await connect(gw)
    async with http, ws:
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "input_audio_buffer.append", "audio": "A" * (21 * 1024 * 1024)})
        assert (await ws.receive_json(timeout=10))["error"]["param"] == "audio"
        await ws.send_json({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "turn_detection": None}}}})
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "input_audio_buffer.append", "audio": chunks(quiet(1.5), 1500)[0],
                            "event_id": "big"})
        full = await ws.receive_json(timeout=5)
        assert (full["error"]["code"], full["error"]["event_id"]) == ("input_audio_buffer_full", "big")


async def test_the_session_cap_closes_with_1001(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine,
                                                tmp_path: Path) -> None:
    gw = make_gateway(engine_config(engine.url, tmp_path / "spool", extra="realtime: {max_session_s: 1}\n"))
    async with aclient(gw) as client, client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        assert created.session.expires_at - time.time() <= 1.5
        with pytest.raises(websockets.exceptions.ConnectionClosedOK):  # 1001: the SDK's iterator would end quietly
            async with asyncio.timeout(5):
                while True:
                    await conn.recv()
    http, ws = await connect(gw)
    async with http, ws:
        await ws.receive_json(timeout=5)
        closing = await ws.receive(timeout=5)
        assert (closing.data, closing.extra) == (1001, "Your session hit the maximum duration of 0.0166667 minutes.")


async def test_sessions_past_the_processs_bound_and_a_keys_limit_are_refused_with_1013(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    text = engine_config(engine.url, tmp_path / "spool",
                         extra="realtime: {max_sessions: 2}\nstate: {backend: memory}\n")
    gw = make_gateway(text.replace('sha256: "', 'limits: [{sessions: 1}], sha256: "', 1))
    http, ws = await connect(gw)
    async with http, ws:
        await ws.receive_json(timeout=5)
        first, closing = await refusal(gw)  # the demo key's one session is open
        assert first["error"]["code"] == "rate_limit_exceeded" and closing.data == 1013
        http2, ws2 = await connect(gw, key=BETA_KEY)
        async with http2, ws2:
            await ws2.receive_json(timeout=5)
            first, closing = await refusal(gw, key=BETA_KEY)  # two sessions open: the process's bound
            assert first["error"]["code"] == "server_busy" and closing.data == 1013
    await asyncio.sleep(0.2)
    http, ws = await connect(gw)  # the slot came back with the close
    async with http, ws:
        assert (await ws.receive_json(timeout=5))["type"] == "session.created"


async def test_an_engine_failure_fails_the_item_and_the_session_goes_on(gw: Gateway, engine: FakeOpenAIEngine) -> None:
    engine.mode, engine.fail_next = "500", 1
    async with aclient(gw) as client, client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await opened(conn)
        await say(conn, 0.5, commits=2)
        failed = await until(conn, "conversation.item.input_audio_transcription.failed")
        assert failed[-1].error.type == "transcription_error" and engine.url not in failed[-1].error.message
        done = await until(conn, "conversation.item.input_audio_transcription.completed")
        assert done[-1].transcript == TEXT


async def test_a_client_gone_mid_item_cancels_its_transcription(gw: Gateway, engine: FakeOpenAIEngine,
                                                               servers: Any) -> None:
    engine.mode = "hang"
    http, ws = await connect(gw)
    async with http:
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "session.update", "session": MANUAL})
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "input_audio_buffer.append", "audio": chunks(tone(0.5, RATE), 500)[0]})
        await ws.send_json({"type": "input_audio_buffer.commit"})
        for _ in range(3):
            await ws.receive_json(timeout=5)  # committed, added, done
        await eventually(lambda: engine.active == 1)
        await ws.close()
    await eventually(lambda: engine.active == 0)
    assert engine.cancelled == 1 and not list(gw.spool_dir.iterdir())


async def test_g711_mu_law_is_expanded_to_pcm16_at_8_khz(gw: Gateway, engine: FakeOpenAIEngine) -> None:
    audioop = pytest.importorskip("audioop")  # the standard library's G.711 (until Python 3.13): the reference
    linear = tone(0.6, 8_000, amplitude=12_000)
    ulaw = audioop.lin2ulaw(linear, 2)
    http, ws = await connect(gw)
    async with http, ws:
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "session.update", "session": {**UPDATE, "audio": {"input": {
            **UPDATE["audio"]["input"], "format": {"type": "audio/pcmu"}, "turn_detection": None}}}})
        updated = await ws.receive_json(timeout=5)
        assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        await ws.send_json({"type": "input_audio_buffer.append", "audio": base64.b64encode(ulaw).decode()})
        await ws.send_json({"type": "input_audio_buffer.commit"})
        for _ in range(5):
            got = await ws.receive_json(timeout=5)
        assert got["type"] == "conversation.item.input_audio_transcription.completed"
    sent = engine.requests[-1].files[0][3]
    assert sent[24:28] == (8_000).to_bytes(4, "little") and sent[44:] == audioop.ulaw2lin(ulaw, 2)


async def test_draining_lets_committed_items_finish_then_closes_1001(gw: Gateway, engine: FakeOpenAIEngine,
                                                                     servers: Any) -> None:
    engine.reply_delay = 0.5  # the item is still being transcribed when the drain begins
    http, ws = await connect(gw)
    async with http, ws:
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "session.update", "session": MANUAL})
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "input_audio_buffer.append", "audio": chunks(tone(0.5, RATE), 500)[0]})
        await ws.send_json({"type": "input_audio_buffer.commit"})
        await ws.receive_json(timeout=5)  # committed
        servers.call(gw.app[DRAINING].set)
        started, kinds = time.monotonic(), []
        while (msg := await ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT:
            kinds.append(json.loads(msg.data)["type"])
        assert kinds[-1] == "conversation.item.input_audio_transcription.completed"
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001) and time.monotonic() - started > 0.3


async def test_a_client_secret_opens_a_session_with_its_pinned_settings(gw: Gateway) -> None:
    async with aclient(gw) as client:
        secret = await client.realtime.client_secrets.create(
            expires_after={"anchor": "created_at", "seconds": 60},
            session={"type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"},
                                                                   "turn_detection": None}}})
    assert secret.value.startswith("ek_")
    async with aclient(gw, key=secret.value) as browser, \
            browser.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = json.loads((await conn.recv()).to_json())["session"]["audio"]["input"]
        assert created["transcription"]["model"] == "whisper-1" and created["turn_detection"] is None
        await say(conn, 0.5)
        assert (await until(conn, "conversation.item.input_audio_transcription.completed"))[-1].transcript == TEXT
    first, closing = await refusal(gw, key="ek_" + "x" * 32)  # unknown (or expired)
    assert first["error"]["code"] == "invalid_api_key" and closing.data == 3000


# -- pass-through: a model routed to an engine that speaks OpenAI's realtime itself -----------------------------

@pytest.fixture
def realtime_engine(servers: Any) -> Any:
    from tests.fakes.openai_realtime_engine import FakeOpenAIRealtime
    engine = FakeOpenAIRealtime(expected_api_key="rt-secret")
    servers.run(engine.start())
    yield engine
    servers.run(engine.stop())


def relayed_config(engine: FakeOpenAIEngine, realtime_url: str, tmp_path: Path) -> str:
    text = engine_config(engine.url, tmp_path / "spool",
                         extra=f"ledger: {{sink: file, path: {tmp_path}/usage.jsonl}}\n")
    text = text.replace("models:\n", f'  rt: {{kind: openai, url: "{realtime_url}", api_key: rt-secret, '
                                      'realtime: true}\nmodels:\n', 1)
    routes = "[{backend: rt, model: gpt-4o-transcribe}, {backend: speaches, model: whisper-large}]"
    return text.replace("voices:\n", f"  live-1: {{task: transcription, routes: {routes}}}\nvoices:\n", 1)


async def test_a_model_on_a_realtime_engine_is_relayed_with_the_engines_own_credential(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, realtime_engine: Any,
        tmp_path: Path) -> None:
    gw = make_gateway(relayed_config(engine, realtime_engine.url, tmp_path))
    update = {"type": "transcription", "audio": {"input": {"transcription": {"model": "live-1"},
                                                           "turn_detection": None}}}
    async with aclient(gw) as client, client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        await conn.session.update(session=update)
        updated = json.loads((await until(conn, "session.updated"))[-1].to_json())["session"]
        assert updated["id"] == created.session.id and updated["audio"]["input"]["transcription"]["model"] == "live-1"
        await say(conn, 1.0)
        events = await until(conn, "conversation.item.input_audio_transcription.completed")
    assert [e.type for e in events][:3] == ["input_audio_buffer.committed", "conversation.item.added",
                                            "conversation.item.done"]
    assert events[-1].transcript == "Hello from the realtime engine."
    headers, query = realtime_engine.handshakes[0]
    assert headers["Authorization"] == "Bearer rt-secret" and query == {"intent": "transcription"}
    assert DEMO_KEY not in json.dumps(realtime_engine.received) + json.dumps(headers)
    models = [e["session"]["audio"]["input"]["transcription"]["model"] for e in realtime_engine.received
              if e["type"] == "session.update"]
    assert models and set(models) == {"gpt-4o-transcribe"}
    assert sum(1 for e in realtime_engine.received if e["type"] == "input_audio_buffer.append") == 10
    assert engine.requests == []  # nothing went to the file route
    record, = wait_ledger(tmp_path / "usage.jsonl", 1)
    assert (record["backend"], record["native_model"], record["model"]) == ("rt", "gpt-4o-transcribe", "live-1")
    assert record["audio_seconds"] == pytest.approx(1.0, abs=0.01) and record["item"] == events[0].item_id


async def test_an_unreachable_realtime_engine_leaves_the_session_with_the_gateway(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    from tests.support import free_port
    gw = make_gateway(relayed_config(engine, f"http://127.0.0.1:{free_port()}/v1", tmp_path))
    update = {"type": "transcription", "audio": {"input": {"transcription": {"model": "live-1"},
                                                           "turn_detection": None}}}
    async with aclient(gw) as client, client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.recv()
        await conn.session.update(session=update)
        await until(conn, "session.updated")
        await say(conn, 0.5)
        done = await until(conn, "conversation.item.input_audio_transcription.completed")
    assert done[-1].transcript == TEXT and engine.requests[-1].form_value("model") == "whisper-large"


async def test_an_engine_closing_a_relayed_session_closes_the_clients_with_its_code(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, realtime_engine: Any,
        tmp_path: Path) -> None:
    gw = make_gateway(relayed_config(engine, realtime_engine.url, tmp_path))
    realtime_engine.close_after = 2  # the session.update, then one append: then it closes 1011
    http, ws = await connect(gw)
    async with http, ws:
        await ws.receive_json(timeout=5)
        await ws.send_json({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "transcription": {"model": "live-1"}}}}})
        await ws.receive_json(timeout=5)  # the engine's session.updated
        await ws.send_json({"type": "input_audio_buffer.append", "audio": chunks(tone(0.2, RATE), 200)[0]})
        closing = await ws.receive(timeout=5)
    assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1011)
    await eventually(lambda: realtime_engine.open == 0)


async def test_one_access_log_line_per_session(gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="gateway.access")
    http, ws = await connect(gw)
    async with http, ws:
        await ws.receive_json(timeout=5)
        await ws.send_str("not json")
        await ws.receive_json(timeout=5)
    await eventually(lambda: any('"/v1/realtime"' in r.getMessage() for r in caplog.records))
    lines = [json.loads(r.getMessage()) for r in caplog.records if '"/v1/realtime"' in r.getMessage()]
    assert len(lines) == 1 and lines[0]["status"] == 101 and lines[0]["tenant"] == "acme"


async def test_an_item_past_a_limit_fails_alone_and_the_next_minute_would_take_it(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    text = engine_config(engine.url, tmp_path / "spool", extra="state: {backend: memory}\n")
    gw = make_gateway(text.replace('sha256: "', 'limits: [{requests: 1, per: minute}], sha256: "', 1))
    async with aclient(gw) as client, client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await opened(conn)
        await say(conn, 0.5, commits=2)
        done = await until(conn, "conversation.item.input_audio_transcription.completed")
        failed = await until(conn, "conversation.item.input_audio_transcription.failed")
    assert done[-1].transcript == TEXT
    assert (failed[-1].error.type, failed[-1].error.code) == ("requests", "rate_limit_exceeded")
    assert sum(1 for r in engine.requests if r.files) == 1  # the refused item never reached the engine


async def test_silence_streamed_faster_than_real_time_is_not_kept(make_gateway: Callable[[str], Gateway],
                                                                  engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    """Server VAD: while nobody speaks only the prefix padding is kept, so a minute of silence sent at once fits
    a one-second buffer; the session reads one event at a time (TCP holds a faster client back)."""
    gw = make_gateway(engine_config(engine.url, tmp_path / "spool", extra="realtime: {max_buffer_s: 1}\n"))
    http, ws = await connect(gw)
    async with http, ws:
        await ws.receive_json(timeout=5)
        piece = chunks(quiet(0.1))[0]
        for _ in range(600):
            await ws.send_json({"type": "input_audio_buffer.append", "audio": piece})
        await ws.send_json({"type": "input_audio_buffer.clear"})
        got = await ws.receive_json(timeout=30)
        assert got["type"] == "input_audio_buffer.cleared", got  # no error came before it


@pytest.mark.parametrize("section, problem", [
    ("realtime: {max_sessions: 2.5}", "realtime.max_sessions: expected a whole number"),
    ("realtime: {max_pending_items: 0}", "realtime.max_pending_items: expected a number >= 1"),
    ("realtime: {max_session_s: .nan}", "realtime.max_session_s"),
    ("realtime: {max_buffer_s: 1e9}", "realtime.max_buffer_s: expected a number from 1 to 3600"),
    ("realtime: {max_session_s: '\\u00e9t\\u00e9'}", "realtime.max_session_s"),
    ("realtime: {idle_s: 3}", "realtime.idle_s: unknown setting"),
    ("realtime: [1]", "realtime: expected a mapping"),
])
def test_the_realtime_section_is_refused_by_yaml_path(engine: FakeOpenAIEngine, tmp_path: Path, section: str,
                                                      problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(engine_config(engine.url, tmp_path, extra=section + "\n"))
    assert any(problem in p for p in caught.value.problems), caught.value.problems
    assert parse_config(engine_config(engine.url, tmp_path)).realtime == Realtime()
