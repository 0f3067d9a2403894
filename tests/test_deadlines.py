"""Per-request deadlines (gateway/deadlines.py): a speech backend's `first_byte_timeout_s` and a transcription
model's `deadline_s`, over HTTP with engine doubles, through the official SDK; and both keys' parsing.

Deadlines here are 0.2-0.5 s and engines are slow just past them; what must not happen (a steady stream cut,
a backend ejected for the model's deadline) is checked by counts and recorded events, not by tight clocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from gateway.config import ConfigError, parse_config
from gateway.state import EJECTIONS
from tests.conftest import Gateway, ServerThread, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine, speech_seconds, synth
from tests.metering_support import make_wav, wait_ledger
from tests.support import assert_settled, expect_error, table_config, wait_for

SPEECH = "/v1/audio/speech"
TRANSCRIBE = "/v1/audio/transcriptions"
TEXT = "Hello."
PCM_BYTES = int(24_000 * speech_seconds(TEXT)) * 2
"""What the doubles synthesize for TEXT as 24 kHz 16-bit PCM, whole."""
WAV = make_wav(1.0)  # measured by its header, at once: the handler's measurement-first path
MP3 = synth("mp3", 1.0)  # measured on the audio workers while the routes are tried: the concurrent path
EJECT_AT_ONCE = "outlier: {consecutive_failures: 1, base_ejection_s: 30, max_ejected_percent: 100}\n"
"""One failure ejects a backend: an attempt wrongly counted as failed would show at once."""


def _speech_gateway(make_gateway: Callable[[str], Gateway], tmp_path: Path, urls: dict[str, str],
                    first_byte_s: float) -> Gateway:
    text = table_config(urls, {"tts-1": ("speech", [(name, "kokoro") for name in urls])}, tmp_path / "spool")
    assert text.count("    connect_timeout_s: 1\n") == len(urls)
    return make_gateway(text.replace("    connect_timeout_s: 1\n",
                                     f"    connect_timeout_s: 1\n    first_byte_timeout_s: {first_byte_s}\n"))


def _speak(c: openai.OpenAI) -> bytes:
    return c.audio.speech.create(model="tts-1", voice="nova", input=TEXT, response_format="pcm").content


def _transcription_gateway(make_gateway: Callable[[str], Gateway], tmp_path: Path, urls: dict[str, str],
                           deadline_s: float, extra: str = "", first_read_timeout_s: float = 2) -> Gateway:
    """A transcription model over `urls`, each backend's timeout_s 2 s but the first route's
    `first_read_timeout_s`."""
    text = table_config(urls, {"whisper-1": ("transcription", [(name, "whisper") for name in urls])},
                        tmp_path / "spool")
    text = text.replace("{task: transcription,", f"{{task: transcription, deadline_s: {deadline_s}, "
                        "price: {per_audio_minute: 0.6},")
    assert "    timeout_s: 2\n" in text
    return make_gateway(text.replace("    timeout_s: 2\n", f"    timeout_s: {first_read_timeout_s}\n", 1) + extra)


def _transcribe(c: openai.OpenAI, upload: tuple[str, bytes, str]) -> str:
    return c.audio.transcriptions.create(model="whisper-1", file=upload, response_format="text")


# -- first_byte_timeout_s (speech) -------------------------------------------------------------------------


def test_a_slow_first_chunk_fails_over_and_the_client_gets_the_next_routes_audio(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine) -> None:
    """The first route sends its headers at once and its first chunk past the timeout: the attempt fails
    before any byte went out, its engine stream is closed (the double's handler is cancelled), and the
    client gets the second route's whole audio."""
    engine.first_chunk_delay = 0.6
    gw = _speech_gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url}, 0.2)
    with sdk(gw) as c:
        audio = _speak(c)
    assert len(audio) == PCM_BYTES
    assert (engine.calls(SPEECH), second.calls(SPEECH)) == (1, 1)
    assert second.finished and not engine.finished  # the first never got to write its audio
    wait_for(lambda: engine.cancelled == 1, what="the slow engine's handler to be cancelled")
    assert_settled(servers, gw, engine, second)


def test_a_slow_first_byte_on_the_only_route_is_a_504(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                                       tmp_path: Path, engine: FakeOpenAIEngine) -> None:
    """Here the engine is slow to answer at all (no headers): the same timeout, over the call itself."""
    engine.mode = "hang"
    engine.hang_seconds = 0.6
    gw = _speech_gateway(make_gateway, tmp_path, {"only": engine.url}, 0.2)
    with sdk(gw) as c, pytest.raises(openai.APIStatusError) as caught:
        _speak(c)
    expect_error(caught.value, 504, "upstream_error", "upstream_timeout", message="first-byte timeout (0.2 s)")
    assert engine.calls(SPEECH) == 1
    wait_for(lambda: engine.cancelled == 1, what="the hanging engine's handler to be cancelled")
    assert_settled(servers, gw, engine)


def test_a_slow_but_steady_stream_is_never_cut_by_the_first_byte_timeout(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path,
        engine: FakeOpenAIEngine) -> None:
    """Six chunks 0.1 s apart: the stream lasts more than twice the first-byte timeout, and arrives whole."""
    engine.chunk_size, engine.chunk_delay = PCM_BYTES // 6, 0.1
    gw = _speech_gateway(make_gateway, tmp_path, {"only": engine.url}, 0.2)
    started = time.monotonic()
    with sdk(gw) as c:
        audio = _speak(c)
    assert time.monotonic() - started >= 0.45  # it did outlast the timeout
    assert len(audio) == PCM_BYTES and engine.calls(SPEECH) == 1 and engine.cancelled == 0
    assert_settled(servers, gw, engine)


# -- deadline_s (transcription) ----------------------------------------------------------------------------


@pytest.mark.parametrize("upload", [("a.wav", WAV, "audio/wav"), ("a.mp3", MP3, "audio/mpeg")], ids=["wav", "mp3"])
def test_past_the_models_deadline_a_504_no_retry_no_bill_no_ejection(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        upload: tuple[str, bytes, str]) -> None:
    """The engine hangs (its own timeout_s is 2 s): at 0.3 s the attempt is cancelled. The SDK, allowed two
    retries, makes none (x-should-retry: false); the ledger line bills nothing; one failure would eject the
    backend, and it is not ejected."""
    engine.mode = "hang"
    ledger = tmp_path / "usage.jsonl"
    gw = _transcription_gateway(make_gateway, tmp_path, {"only": engine.url}, 0.3,
                                EJECT_AT_ONCE + f"ledger: {{sink: file, path: {ledger}}}\n")
    with sdk(gw, max_retries=2) as c, pytest.raises(openai.APIStatusError) as caught:
        _transcribe(c, upload)
    expect_error(caught.value, 504, "upstream_error", "upstream_timeout",
                 message="model `whisper-1` did not complete within its deadline of 0.3 seconds")
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert engine.started == 1
    wait_for(lambda: engine.cancelled == 1, what="the attempt in flight to be cancelled")
    [record] = wait_ledger(ledger, 1)
    assert (record["status"], record["billable"], record["audio_seconds"], record["cost_usd"]) == (504, False, 0, 0)
    assert servers.call(lambda: gw.app[EJECTIONS].ejected()) == {"only": None}
    assert_settled(servers, gw, engine)


def test_the_deadline_spans_every_attempt_and_failover(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine) -> None:
    """The first route times out by its own timeout_s (0.2 s), within the deadline: that counts against it
    (ejected at once). The failover goes on under the same deadline, which cuts the second route's attempt
    at 0.6 s from the first's start; that says nothing of its backend."""
    engine.mode = second.mode = "hang"
    gw = _transcription_gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url}, 0.6,
                                EJECT_AT_ONCE, first_read_timeout_s=0.2)
    with sdk(gw) as c, pytest.raises(openai.APIStatusError) as caught:
        _transcribe(c, ("a.mp3", MP3, "audio/mpeg"))
    expect_error(caught.value, 504, "upstream_error", "upstream_timeout", message="deadline of 0.6 seconds")
    assert (engine.started, second.started) == (1, 1)
    wait_for(lambda: engine.active == second.active == 0, what="both attempts to end")
    assert second.cancelled == 1
    ejected = servers.call(lambda: gw.app[EJECTIONS].ejected())
    assert ejected["first"] is not None and ejected["second"] is None


@pytest.mark.parametrize("upload", [("a.wav", WAV, "audio/wav"), ("a.mp3", MP3, "audio/mpeg")], ids=["wav", "mp3"])
def test_within_the_deadline_a_failover_still_answers(
        make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine, second: FakeOpenAIEngine,
        upload: tuple[str, bytes, str]) -> None:
    engine.mode = "500"
    gw = _transcription_gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url}, 2)
    with sdk(gw) as c:
        assert _transcribe(c, upload).strip() == second.transcript_text
    assert (engine.calls(TRANSCRIBE), second.calls(TRANSCRIBE)) == (1, 1)


# -- parsing -----------------------------------------------------------------------------------------------

_CONFIG = """
keys: [{{name: demo, key: k}}]
backends:
  b: {{kind: openai, url: "http://127.0.0.1:9/v1"{backend}}}
models:
  whisper-1: {{task: transcription, routes: [{{backend: b}}]{transcription}}}
  tts-1: {{task: speech, routes: [{{backend: b}}]{speech}}}
"""


def _parse(backend: str = "", transcription: str = "", speech: str = "") -> object:
    return parse_config(_CONFIG.format(backend=backend, transcription=transcription, speech=speech))


HOSTILE = [".nan", ".NaN", ".inf", "-.inf", "-1", "-0.5", "0", "0.0", "86401", "86400.5", "1e400",
           "100000000000000000000000000000000000000", "'nan'", "'inf'", "'abc'", "''", "true", "false", "[1]",
           "{a: 1}", "'1 s'"]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("where", ["backend", "transcription"])
def test_hostile_deadlines_are_refused_by_path(where: str, value: str) -> None:
    key, path = (("first_byte_timeout_s", "backends.b.first_byte_timeout_s") if where == "backend"
                 else ("deadline_s", "models.whisper-1.deadline_s"))
    with pytest.raises(ConfigError) as caught:
        _parse(**{where: f", {key}: {value}"})
    [problem] = caught.value.problems
    assert problem.startswith(f"{path}: expected seconds above 0 and at most 86400, got "), problem
    assert len(problem) < 200


@pytest.mark.parametrize(("value", "expected"), [("0.25", 0.25), ("1", 1.0), ("'1.5'", 1.5), ("86400", 86400.0),
                                                 ("null", None)])
def test_deadlines_parse(value: str, expected: float | None) -> None:
    config = _parse(backend=f", first_byte_timeout_s: {value}", transcription=f", deadline_s: {value}")
    assert config.backends["b"].timeouts.first_byte == expected  # type: ignore[attr-defined]
    assert config.models["whisper-1"].deadline_s == expected  # type: ignore[attr-defined]


def test_both_are_off_by_default() -> None:
    config = _parse()
    assert config.backends["b"].timeouts.first_byte is None  # type: ignore[attr-defined]
    assert config.models["whisper-1"].deadline_s is None  # type: ignore[attr-defined]


def test_a_speech_model_has_no_deadline() -> None:
    with pytest.raises(ConfigError) as caught:
        _parse(speech=", deadline_s: 10")
    [problem] = caught.value.problems
    assert problem.startswith("models.tts-1.deadline_s: only for transcription models: a speech stream lasts as "
                              "long as its audio"), problem
