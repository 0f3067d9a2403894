"""Where OpenAI's own spec and SDKs found gaps: model retrieval, streamed transcripts from engines that
answer whole, the `transcript.text.done` shape, `x-should-retry`, and what the access log and metrics
count for streams that were cut or abandoned."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp
import httpx2
import openai
import pytest

from tests.conftest import BETA_KEY, DEMO_KEY, Gateway, ServerThread, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import metered_config, scrape_settled, total, wait_ledger
from tests.support import WAV, expect_error

IRE = "invalid_request_error"
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}


def test_retrieve_model(client: openai.OpenAI, gateway: Gateway) -> None:
    model = client.models.retrieve("tts-1")
    listed = {m.id: m for m in client.models.list()}
    assert model == listed["tts-1"] and model.object == "model"


@pytest.mark.parametrize(("key", "name"), [(DEMO_KEY, "tts-42"), (BETA_KEY, "whisper-1"), (DEMO_KEY, "a/b/c")],
                         ids=["unknown", "not-for-this-key", "with-slashes"])
def test_retrieve_model_not_found(gateway: Gateway, key: str, name: str) -> None:
    with sdk(gateway.base_url, key) as client, \
            pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve(name)
    expect_error(info.value, 404, IRE, "model_not_found", "model", message=name)


def test_stream_from_an_engine_that_answers_whole(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    """whisper-1 style engines ignore `stream`: the gateway still streams OpenAI's events, as README says."""
    engine.ignores_stream = True
    events = list(client.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                                     stream=True))
    assert engine.last.form_value("stream") == "true"
    assert [e.type for e in events] == ["transcript.text.delta", "transcript.text.done"]
    assert events[0].delta == events[1].text == engine.transcript_text


def test_done_event_usage_only_in_a_shape_the_schema_allows(client: openai.OpenAI, engine: FakeOpenAIEngine,
                                                            make_gateway: Callable[[str], Gateway]) -> None:
    """`transcript.text.done` allows only token usage; the gateway counts seconds, so it sends none. An
    engine's own token usage is relayed untouched."""
    for ignores in (True, False):
        engine.ignores_stream = ignores
        response = client.post("/audio/transcriptions", cast_to=httpx2.Response,
                               body={"model": "whisper-1", "stream": "true"},
                               files={"file": ("a.wav", WAV, "audio/wav")},
                               options={"headers": {"Content-Type": "multipart/form-data"}})
        done = [json.loads(line[6:]) for line in response.text.splitlines() if '"transcript.text.done"' in line]
        assert len(done) == 1
        usage = done[0].get("usage")
        assert usage is None or usage["type"] == "tokens", done


def test_sse_with_crlf_line_ends_is_billed(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                           engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.jsonl"
    gateway = make_gateway(metered_config(engine.url, tmp_path / "spool", ledger_path=ledger))
    engine.sse_crlf = True
    with sdk(gateway.base_url) as client:
        events = list(client.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                                         stream=True))
    assert events[-1].type == "transcript.text.done"
    [record] = wait_ledger(ledger, 1)
    assert (record["billable"], record["characters"]) == (True, len(engine.transcript_text))


# -- x-should-retry: false wherever the same request would fail the same way ---------------------------------


def test_client_errors_say_not_to_retry(client: openai.OpenAI, gateway: Gateway) -> None:
    failures: list[openai.APIStatusError] = []
    for call in (lambda: client.audio.speech.create(model="tts-1", voice="nova", input=""),
                 lambda: client.audio.speech.create(model="tts-42", voice="nova", input="a"),
                 lambda: client.get("/audio/speech", cast_to=httpx2.Response),
                 lambda: client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"\0" * 2_100_000))):
        with pytest.raises(openai.APIStatusError) as info:
            call()
        failures.append(info.value)
    with sdk(gateway.base_url, "sk-wrong") as stranger, \
            pytest.raises(openai.AuthenticationError) as auth:
        stranger.models.list()
    with sdk(gateway.base_url, BETA_KEY) as beta, \
            pytest.raises(openai.PermissionDeniedError) as denied:
        beta.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV))
    failures += [auth.value, denied.value]
    assert [f.status_code for f in failures] == [400, 404, 405, 413, 401, 403]
    assert all(f.response.headers.get("x-should-retry") == "false" for f in failures)


def test_retriable_errors_leave_the_decision_to_the_sdk(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    for mode, error in (("429", openai.RateLimitError), ("500", openai.InternalServerError)):
        engine.mode = mode
        with pytest.raises(error) as info:
            client.audio.speech.create(model="tts-1", voice="nova", input="a")
        assert "x-should-retry" not in info.value.response.headers, mode


# -- what the access log and metrics count ---------------------------------------------------------------------


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]


async def test_bytes_out_of_a_stream_cut_by_the_engine(caplog: pytest.LogCaptureFixture,
                                                       make_gateway: Callable[[str], Gateway],
                                                       engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gateway = make_gateway(metered_config(engine.url, tmp_path / "spool"))
    engine.mode, engine.chunk_size = "drop_midstream", 2048
    received = 0
    with caplog.at_level(logging.INFO, logger="gateway"):
        async with aiohttp.ClientSession() as session, session.post(
                gateway.base_url + "/audio/speech", headers=AUTH,
                json={"model": "tts-1", "voice": "nova", "input": "Hello there.", "response_format": "pcm"}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in r.content.iter_any():
                    received += len(chunk)
        await asyncio.sleep(0.2)
    [line] = _access_lines(caplog)
    assert received == 2 * 2048
    assert (line["bytes_out"], line["cut_after_first_byte"]) == (received, "disconnect")
    _, samples = await asyncio.to_thread(scrape_settled, gateway.url + "/metrics", 1)
    assert total(samples, "gateway_response_bytes_total", endpoint="/v1/audio/speech") == received


async def test_client_leaving_mid_stream_logs_one_line_and_no_traceback(caplog: pytest.LogCaptureFixture,
                                                                        gateway: Gateway,
                                                                        engine: FakeOpenAIEngine) -> None:
    engine.chunk_size, engine.chunk_delay = 4096, 0.02
    received = 0
    with caplog.at_level(logging.DEBUG):
        async with aiohttp.ClientSession() as session:
            r = await session.post(gateway.base_url + "/audio/speech", headers=AUTH, json={
                "model": "tts-1", "voice": "nova", "input": "Slowly now. " * 40, "response_format": "pcm"})
            while received < 3 * 4096:
                received += len(await r.content.readany())
            r.close()
        for _ in range(100):
            if _access_lines(caplog):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
    [line] = _access_lines(caplog)
    assert line["status"] == 499
    assert received <= int(line["bytes_out"]) < len("Slowly now. " * 40) * 24_000  # counted, not 0 or whole
    assert not [r for r in caplog.records if r.exc_info or "Error handling request" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("gateway")]
