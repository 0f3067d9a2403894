"""Metering end to end: what each tenant is billed (in /metrics, read with prometheus-client's own parser, and in
the usage ledger), that failures are never billed, one ledger record per request, the metric families and their
labels, bounded cardinality, and where /metrics is served.

The engine double's audio is `speech_seconds(input)` long. Raw PCM (and WAV) is metered exactly; mp3 is
metered from its packet durations, which include the encoder's padding (LAME adds ~0.05 s), so mp3 is checked
within a tolerance.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway import __version__
from tests.conftest import BETA_KEY, DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, engine_config, sdk
from tests.fakes.openai_engine import RATE, FakeOpenAIEngine, speech_seconds
from tests.metering_support import (
    LEDGER_FIELDS,
    TTS1_PRICE,
    families,
    http_get,
    label_sets,
    make_wav,
    metered_config,
    parse_metrics,
    per_label,
    scrape,
    scrape_settled,
    total,
    wait_ledger,
)
from tests.support import assert_settled, check_error, expect_error, free_port

BAD_KEY = "sk-not-a-gateway-key-42"
MP3_PADDING = (0.0, 0.1)
"""mp3 as metered minus the audio the engine made: LAME's encoder delay and last-frame padding."""
TRANSCRIPT = "Grüße aus Köln — naïve café, 10 €."
"""The double's transcript: non-ASCII, so billing counts code points, not bytes."""
UPLOAD_SECONDS = 1.25
LONG_TEXT = "This sentence is spoken slowly, one small chunk at a time. " * 4


def pcm_seconds(text: str) -> float:
    """Exactly what the double sends for `text` as pcm (whole samples)."""
    return int(RATE * speech_seconds(text)) / RATE


def tts1_cost(characters: int, seconds: float) -> float:
    return characters / 1_000_000 * TTS1_PRICE["per_million_characters"] + seconds / 60 * TTS1_PRICE["per_audio_minute"]


BILLING_FAMILIES = ("gateway_billable_characters", "gateway_billable_audio_seconds", "gateway_cost_usd")


def billing_samples(samples: dict[Any, float]) -> dict[Any, float]:
    """The billing counters' samples, `_created` included (so a new series shows too)."""
    return {k: v for k, v in samples.items() if k[0].startswith(BILLING_FAMILIES)}


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger" / "usage.jsonl"


@pytest.fixture
def metered(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path,
            ledger_path: Path) -> Gateway:
    engine.transcript_text = TRANSCRIPT
    return make_gateway(metered_config(engine.url, tmp_path / "spool", ledger_path=ledger_path, timeout_s=1))


def test_two_tenants_are_billed_exactly_and_failures_never(servers: ServerThread, metered: Gateway,
                                                          engine: FakeOpenAIEngine, ledger_path: Path) -> None:
    wav = make_wav(UPLOAD_SECONDS)
    sent: dict[str, str] = {}
    """request id -> what the request was."""

    def rid(what: str) -> dict[str, Any]:
        request_id = f"test-{what}-{uuid.uuid4().hex[:8]}"
        sent[request_id] = what
        return {"extra_headers": {"X-Request-ID": request_id}}

    acme, beta, stranger = sdk(metered, DEMO_KEY), sdk(metered, BETA_KEY), sdk(metered, BAD_KEY)

    # -- successes -----------------------------------------------------------------------------------------
    a_pcm = "Hello from acme, billed by the character: Grüße! 🎧"
    a_mp3 = "An mp3, metered by its packets."
    a_sse = "Streamed as server-sent events."
    b_pcm = "Beta tenant, first request."
    b_wav = "A second one from beta, as WAV, with an invented voice."
    audio = acme.audio.speech.create(model="tts-1", voice="nova", input=a_pcm, response_format="pcm",
                                     **rid("a-pcm")).content
    assert len(audio) == pcm_seconds(a_pcm) * RATE * 2
    acme.audio.speech.create(model="tts-1-hd", voice="alloy", input=a_mp3, response_format="mp3", **rid("a-mp3"))
    sse = acme.audio.speech.create(model="tts-1", voice="nova", input=a_sse, response_format="pcm",
                                   stream_format="sse", **rid("a-sse")).content
    assert b"speech.audio.done" in sse
    text = acme.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav, "audio/wav"),
                                            **rid("a-transcribe"))
    assert text.text == TRANSCRIPT
    translated = acme.audio.translations.create(model="whisper-1", file=("a.wav", wav, "audio/wav"),
                                                response_format="text", **rid("a-translate"))
    assert str(translated).strip() == TRANSCRIPT
    beta.audio.speech.create(model="tts-1", voice="nova", input=b_pcm, response_format="pcm", **rid("b-pcm"))
    beta.audio.speech.create(model="tts-1", voice="my-own-voice", input=b_wav, response_format="wav",
                             **rid("b-wav"))
    successes = set(sent.values())

    expected_chars = {"acme": len(a_pcm) + len(a_mp3) + len(a_sse) + 2 * len(TRANSCRIPT),
                      "beta": len(b_pcm) + len(b_wav)}
    exact_seconds = {"acme": pcm_seconds(a_pcm) + pcm_seconds(a_sse) + 2 * UPLOAD_SECONDS,
                     "beta": pcm_seconds(b_pcm) + pcm_seconds(b_wav)}
    mp3_seconds = speech_seconds(a_mp3)
    expected_cost = {"acme": tts1_cost(len(a_pcm), pcm_seconds(a_pcm)) + tts1_cost(len(a_sse), pcm_seconds(a_sse)),
                     "beta": tts1_cost(len(b_pcm), pcm_seconds(b_pcm)) + tts1_cost(len(b_wav), pcm_seconds(b_wav))}

    _, before = scrape_settled(metered.url + "/metrics", len(sent))
    assert per_label(before, "gateway_billable_characters_total", "tenant") == expected_chars
    seconds = per_label(before, "gateway_billable_audio_seconds_total", "tenant")
    assert seconds["beta"] == pytest.approx(exact_seconds["beta"], abs=1e-6)
    mp3_measured = seconds["acme"] - exact_seconds["acme"]
    assert MP3_PADDING[0] <= mp3_measured - mp3_seconds <= MP3_PADDING[1], (mp3_measured, mp3_seconds)
    assert per_label(before, "gateway_cost_usd_total", "tenant") == pytest.approx(expected_cost, rel=1e-9)
    assert {s["model"] for s in label_sets(before, "gateway_cost_usd_total")} == {"tts-1"}  # only priced models
    assert total(before, "gateway_billable_audio_seconds_total", tenant="acme",
                 endpoint="/v1/audio/transcriptions") == pytest.approx(UPLOAD_SECONDS, abs=1e-6)
    assert total(before, "gateway_billable_characters_total", tenant="acme", model="whisper-1") == 2 * len(TRANSCRIPT)

    # -- failures: none of them may move a billing counter ----------------------------------------------------
    with pytest.raises(openai.AuthenticationError) as info:
        stranger.audio.speech.create(model="tts-1", voice="nova", input="Who am I?", **rid("bad-key"))
    expect_error(info.value, 401, "invalid_request_error", "invalid_api_key", secrets=(BAD_KEY,))
    with pytest.raises(openai.NotFoundError):
        acme.audio.speech.create(model="tts-42", voice="nova", input="No such model.", **rid("unknown-model"))
    with pytest.raises(openai.PermissionDeniedError):
        beta.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav, "audio/wav"), **rid("b-forbidden"))
    engine.mode = "500"
    with pytest.raises(openai.InternalServerError) as info:
        beta.audio.speech.create(model="tts-1", voice="nova", input="The engine fails.", **rid("b-500"))
    assert info.value.status_code == 502
    engine.mode = "hang"
    with pytest.raises(openai.InternalServerError) as info:
        acme.audio.transcriptions.create(model="whisper-1", file=("a.wav", wav, "audio/wav"), **rid("a-hang"))
    assert info.value.status_code == 504
    engine.mode = "ok"

    engine.chunk_size, engine.chunk_delay = 4096, 0.05  # LONG_TEXT is ~14 s of pcm: ~170 chunks, ~8 s to send
    received = 0
    with acme.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=LONG_TEXT,
                                                          response_format="pcm", **rid("a-abandoned")) as response:
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received >= 3 * 4096:
                break  # leaving the block closes the connection mid-stream
    engine.chunk_delay = 0.0

    records = wait_ledger(ledger_path, len(sent) - 1)  # all but the request without a valid key
    assert_settled(servers, metered, engine)
    text_after, after = scrape_settled(metered.url + "/metrics", len(sent))
    assert billing_samples(after) == billing_samples(before), "a failed request moved a billing counter"

    # -- the ledger: exactly one record per request, failures not billable ------------------------------------
    counts = collections.Counter(r["request_id"] for r in records)
    assert counts == {rid: 1 for rid, what in sent.items() if what != "bad-key"}, counts
    by_what = {sent[r["request_id"]]: r for r in records}
    for record in records:
        assert set(record) == LEDGER_FIELDS, record
        stamp = datetime.datetime.fromisoformat(record["time"])
        assert stamp.utcoffset() == datetime.timedelta(0)
        assert abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) < 60
    for what in successes:
        record = by_what[what]
        assert (record["status"], record["billable"], record["completed"]) == (200, True, True), record
        assert record["backend"] == "speaches"
        assert (record["tenant"], record["key"]) == (("acme", "demo") if what.startswith("a-") else ("beta", "beta"))
    assert sum(r["characters"] for r in records if r["billable"] and r["tenant"] == "acme") == expected_chars["acme"]
    assert sum(r["characters"] for r in records if r["billable"] and r["tenant"] == "beta") == expected_chars["beta"]
    assert sum(r["audio_seconds"] for r in records if r["billable"] and r["tenant"] == "beta") == pytest.approx(
        exact_seconds["beta"], abs=2e-3)  # the ledger rounds each record to the millisecond

    pcm = by_what["a-pcm"]
    assert pcm["endpoint"] == "/v1/audio/speech"
    assert (pcm["model"], pcm["native_model"], pcm["voice"]) == ("tts-1", "kokoro", "af_nova")
    assert pcm["characters"] == len(a_pcm)
    assert pcm["audio_seconds"] == round(pcm_seconds(a_pcm), 3)
    assert pcm["cost_usd"] == pytest.approx(tts1_cost(len(a_pcm), pcm_seconds(a_pcm)), rel=1e-9)
    mp3 = by_what["a-mp3"]
    assert (mp3["model"], mp3["native_model"], mp3["voice"], mp3["cost_usd"]) == ("tts-1-hd", "kokoro-hd",
                                                                                  "af_alloy", None)
    assert MP3_PADDING[0] <= mp3["audio_seconds"] - mp3_seconds <= MP3_PADDING[1], mp3
    assert by_what["a-sse"]["audio_seconds"] == round(pcm_seconds(a_sse), 3)
    wav_record = by_what["b-wav"]
    assert (wav_record["voice"], wav_record["audio_seconds"]) == ("my-own-voice", round(pcm_seconds(b_wav), 3))
    for what, endpoint in (("a-transcribe", "/v1/audio/transcriptions"), ("a-translate", "/v1/audio/translations")):
        record = by_what[what]
        assert (record["endpoint"], record["model"], record["native_model"], record["voice"]) == (
            endpoint, "whisper-1", "Systran/faster-whisper-small", None)
        assert (record["characters"], record["audio_seconds"], record["cost_usd"]) == (
            len(TRANSCRIPT), UPLOAD_SECONDS, None)

    failed = {"unknown-model": 404, "b-forbidden": 403, "b-500": 502, "a-hang": 504}
    for what, status in failed.items():
        record = by_what[what]
        assert (record["status"], record["billable"], record["completed"]) == (status, False, False), record
        assert (record["characters"], record["audio_seconds"]) == (0, 0), record
        assert record["cost_usd"] in (None, 0), record
    assert "bad-key" not in by_what  # anyone could write ledger lines without a key: none is written
    assert (by_what["b-forbidden"]["tenant"], by_what["b-forbidden"]["key"]) == ("beta", "beta")
    assert (by_what["b-500"]["model"], by_what["b-500"]["backend"]) == ("tts-1", "speaches")

    # -- the abandoned stream: recorded as delivered, not billed ------------------------------------------------
    abandoned = by_what["a-abandoned"]
    assert (abandoned["status"], abandoned["billable"], abandoned["completed"]) == (499, False, False), abandoned
    assert abandoned["tenant"] == "acme" and abandoned["model"] == "tts-1"
    full = pcm_seconds(LONG_TEXT)
    assert received / (RATE * 2) - 1e-3 <= abandoned["audio_seconds"] < full / 2, (received, abandoned)
    assert abandoned["characters"] in (0, len(LONG_TEXT))  # the input the engine consumed, or nothing
    assert total(after, "gateway_requests_total", tenant="acme", code="499") == 1

    # -- requests by tenant and status in /metrics --------------------------------------------------------------
    for tenant, code, n in (("acme", "200", 5), ("beta", "200", 2), ("", "401", 1), ("acme", "404", 1),
                            ("beta", "403", 1), ("beta", "502", 1), ("acme", "504", 1)):
        assert total(after, "gateway_requests_total", tenant=tenant, code=code) == n, (tenant, code)
    assert total(after, "gateway_upstream_errors_total", backend="speaches", reason="backend_5xx") == 1
    assert total(after, "gateway_upstream_errors_total", backend="speaches", reason="timeout") == 1
    in_flight = {dict(labels)["endpoint"]: v for (name, labels), v in after.items()
                 if name == "gateway_in_flight_requests"}
    assert in_flight.pop("/metrics") == 1  # this scrape
    assert in_flight and all(v == 0 for v in in_flight.values()), in_flight

    # -- no key in either -------------------------------------------------------------------------------------
    ledger_text = ledger_path.read_text()
    for secret in (DEMO_KEY, BETA_KEY, BAD_KEY, ENGINE_KEY):
        assert secret not in text_after and secret not in ledger_text, secret
    for client in (acme, beta, stranger):
        client.close()


def test_metric_families_and_labels(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                    engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gateway = make_gateway(metered_config(engine.url, tmp_path / "spool", timeout_s=1))
    client = sdk(gateway, DEMO_KEY)
    client.audio.speech.create(model="tts-1", voice="nova", input="Hello there.", response_format="pcm")
    client.audio.transcriptions.create(model="whisper-1", file=("a.wav", make_wav(0.5), "audio/wav"))
    engine.mode = "500"
    with pytest.raises(openai.InternalServerError):
        client.audio.speech.create(model="tts-1", voice="nova", input="Fails.")
    engine.mode = "hang"
    errors: list[BaseException] = []

    def hanging() -> None:
        try:
            client.audio.speech.create(model="tts-1", voice="nova", input="Hangs.")
        except openai.InternalServerError as exc:
            errors.append(exc)

    thread = threading.Thread(target=hanging)
    thread.start()
    deadline = time.monotonic() + 3
    while total(scrape(gateway.url + "/metrics")[1], "gateway_in_flight_requests", endpoint="/v1/audio/speech") != 1:
        assert time.monotonic() < deadline, "the hanging request never showed in flight"
        time.sleep(0.02)
    thread.join(5)
    assert [getattr(e, "status_code", None) for e in errors] == [504]
    engine.mode = "ok"
    client.close()

    text, samples = scrape(gateway.url + "/metrics")
    fams = families(text)
    expected: dict[str, tuple[str, set[str]]] = {
        "gateway_requests": ("counter", {"endpoint", "model", "backend", "tenant", "code"}),
        "gateway_request_duration_seconds": ("histogram", {"endpoint", "model", "backend"}),
        "gateway_upstream_duration_seconds": ("histogram", {"backend", "endpoint"}),
        "gateway_speech_first_byte_seconds": ("histogram", {"model"}),
        "gateway_billable_characters": ("counter", {"tenant", "model"}),
        "gateway_billable_audio_seconds": ("counter", {"tenant", "model", "endpoint"}),
        "gateway_cost_usd": ("counter", {"tenant", "model"}),
        "gateway_request_bytes": ("counter", {"endpoint"}),
        "gateway_response_bytes": ("counter", {"endpoint"}),
        "gateway_in_flight_requests": ("gauge", {"endpoint"}),
        "gateway_upstream_errors": ("counter", {"backend", "reason"}),
        "gateway_build_info": ("gauge", {"version"}),
    }
    for name, (type_, labels) in expected.items():
        assert name in fams, f"{name} missing from /metrics"
        family = fams[name]
        assert family.type == type_, (name, family.type)
        assert family.samples, f"{name} has no samples"
        for sample in family.samples:
            extra = {"le"} if sample.name.endswith("_bucket") else set()
            assert set(sample.labels) == labels | extra, (sample.name, sample.labels)

    speech = {"endpoint": "/v1/audio/speech", "model": "tts-1", "backend": "speaches"}
    for code in ("200", "502", "504"):
        assert total(samples, "gateway_requests_total", tenant="acme", code=code, **speech) == 1, code
    assert total(samples, "gateway_request_duration_seconds_count", **speech) == 3
    assert total(samples, "gateway_request_duration_seconds_bucket", le="+Inf", **speech) == 3
    assert total(samples, "gateway_upstream_duration_seconds_count", backend="speaches",
                 endpoint="/v1/audio/speech") == 1  # only the answer that came; failures are counted as errors
    assert total(samples, "gateway_upstream_duration_seconds_count", endpoint="/v1/audio/transcriptions") == 1
    assert total(samples, "gateway_speech_first_byte_seconds_count", model="tts-1") == 1
    assert total(samples, "gateway_upstream_errors_total", backend="speaches", reason="backend_5xx") == 1
    assert total(samples, "gateway_upstream_errors_total", backend="speaches", reason="timeout") == 1
    assert total(samples, "gateway_in_flight_requests", endpoint="/v1/audio/speech") == 0
    assert samples[("gateway_build_info", frozenset({("version", __version__)}))] == 1
    assert total(samples, "gateway_request_bytes_total", endpoint="/v1/audio/transcriptions") >= len(make_wav(0.5))
    assert total(samples, "gateway_response_bytes_total", endpoint="/v1/audio/speech") >= pcm_seconds(
        "Hello there.") * RATE * 2
    assert total(samples, "gateway_billable_characters_total", tenant="acme", model="tts-1") == len("Hello there.")
    assert total(samples, "gateway_billable_audio_seconds_total", tenant="acme", model="whisper-1",
                 endpoint="/v1/audio/transcriptions") == pytest.approx(0.5)
    assert total(samples, "gateway_cost_usd_total", tenant="acme", model="tts-1") == pytest.approx(
        tts1_cost(len("Hello there."), pcm_seconds("Hello there.")), rel=1e-9)
    assert not label_sets(samples, "gateway_cost_usd_total") or all(
        s["model"] == "tts-1" for s in label_sets(samples, "gateway_cost_usd_total"))
    assert DEMO_KEY not in text and ENGINE_KEY not in text


def test_metrics_disabled_is_404_and_requests_still_work(make_gateway: Callable[[str], Gateway],
                                                         engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gateway = make_gateway(engine_config(engine.url, tmp_path / "spool", extra="metrics: {enabled: false}\n"))
    status, headers, body = http_get(gateway.url + "/metrics")
    check_error(status, headers, body, expected_status=404, type_="invalid_request_error", code=None)
    with sdk(gateway, DEMO_KEY) as client:
        audio = client.audio.speech.create(model="tts-1", voice="nova", input="Still speaking.",
                                           response_format="pcm").content
        assert len(audio) == pcm_seconds("Still speaking.") * RATE * 2
        assert client.audio.transcriptions.create(model="whisper-1", file=("a.wav", make_wav(0.3), "audio/wav")).text
    assert http_get(gateway.url + "/metrics")[0] == 404


def test_metrics_on_their_own_port(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine,
                                   tmp_path: Path) -> None:
    port = free_port()
    gateway = make_gateway(engine_config(engine.url, tmp_path / "spool",
                                         extra=f"metrics: {{port: {port}, host: 127.0.0.1}}\n"))
    status, headers, body = http_get(gateway.url + "/metrics")
    check_error(status, headers, body, expected_status=404, type_="invalid_request_error", code=None)
    with sdk(gateway, BETA_KEY) as client:
        client.audio.speech.create(model="tts-1", voice="nova", input="Counted elsewhere.", response_format="pcm")
    _, samples = scrape(f"http://127.0.0.1:{port}/metrics")
    assert total(samples, "gateway_billable_characters_total", tenant="beta") == len("Counted elsewhere.")
    assert total(samples, "gateway_build_info", version=__version__) == 1
    assert http_get(f"http://127.0.0.1:{port}/v1/models")[0] == 404  # the public API is not on the metrics port
    assert http_get(gateway.url + "/metrics")[0] == 404


async def _hammer(url: str, bodies: list[dict[str, Any]], expect: int, batch: int = 100) -> None:
    headers = {"Authorization": f"Bearer {DEMO_KEY}"}
    connector = aiohttp.TCPConnector(limit=batch)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(body: dict[str, Any]) -> int:
            async with session.post(url, json=body, headers=headers) as response:
                await response.read()
                return response.status

        for start in range(0, len(bodies), batch):
            statuses = await asyncio.gather(*(one(b) for b in bodies[start:start + batch]))
            assert set(statuses) == {expect}, collections.Counter(statuses)


N_INVENTED = 300


def test_invented_models_and_voices_create_no_time_series(make_gateway: Callable[[str], Gateway],
                                                          engine: FakeOpenAIEngine, tmp_path: Path,
                                                          ledger_path: Path) -> None:
    """Hundreds of invented model and voice names each: not one new series (any one would show). A batch of 100
    at once on a loaded machine may wait more than the `metered` fixture's 1 s for the engine: 10 s here."""
    metered = make_gateway(metered_config(engine.url, tmp_path / "spool", ledger_path=ledger_path, timeout_s=10))
    url = metered.base_url + "/audio/speech"

    def body(model: str, voice: str) -> dict[str, Any]:
        return {"model": model, "voice": voice, "input": "Hi.", "response_format": "pcm"}

    # warm-up: each label path once (an unknown model -> 404; an unknown voice -> passed through -> 200;
    # a scrape, which is a request too)
    asyncio.run(_hammer(url, [body("warm-up-model", "nova")], 404))
    asyncio.run(_hammer(url, [body("tts-1", "warm-up-voice")], 200))
    scrape(metered.url + "/metrics")
    _, before = scrape_settled(metered.url + "/metrics", 2)
    started = time.monotonic()
    asyncio.run(_hammer(url, [body(f"model-{i}-{uuid.uuid4().hex}", "nova") for i in range(N_INVENTED)], 404))
    asyncio.run(_hammer(url, [body("tts-1", f"voice-{i}-{uuid.uuid4().hex}") for i in range(N_INVENTED)], 200))
    elapsed = time.monotonic() - started
    text, after = scrape_settled(metered.url + "/metrics", 2 * N_INVENTED + 2)

    assert len(after) == len(before), sorted(set(after) - set(before), key=str)[:10]
    assert set(after) == set(before)
    assert "model-" not in text and "voice-" not in text
    assert total(after, "gateway_requests_total", model="", code="404") == N_INVENTED + 1
    assert total(after, "gateway_requests_total", model="tts-1", code="200") == N_INVENTED + 1
    assert total(after, "gateway_billable_characters_total", model="tts-1") == (N_INVENTED + 1) * len("Hi.")
    voices = {r.json["voice"] for r in engine.requests if r.json}
    assert len(voices) == N_INVENTED + 1  # the voices did reach the engine
    assert elapsed < 20, f"{2 * N_INVENTED} requests took {elapsed:.1f} s"
    records = wait_ledger(ledger_path, 2 * N_INVENTED + 2, timeout=10)
    assert len(records) == 2 * N_INVENTED + 2
    assert collections.Counter(r["billable"] for r in records) == {True: N_INVENTED + 1, False: N_INVENTED + 1}


def test_parse_metrics_rejects_what_prometheus_would() -> None:
    """The helper this file relies on really parses (and so could fail on) the exposition format."""
    samples = parse_metrics('# TYPE x counter\nx_total{a="1"} 2.0\n')
    assert samples == {("x_total", frozenset({("a", "1")})): 2.0}
    with pytest.raises(ValueError):
        parse_metrics('x_total{a="1" 2.0\n')
