"""Self-tests of the tone-transcribing double (tests/fakes/tone_transcriber.py) and the long-audio fixture
(tests/long_audio_fixture.py), driven over real HTTP with aiohttp: what the long-audio tests rely on."""

from __future__ import annotations

import io
import json
import wave

import aiohttp
import pytest
import srt
import webrtcvad

from gateway.audio.splitter import MODE
from tests.fakes.audio import encode
from tests.fakes.tone_transcriber import RATE, WORDS, ToneTranscriber
from tests.long_audio_fixture import QUIET_RMS, buzz, layout, long_tones, quiet, silences

WAV, BURSTS = long_tones(7, 1.0)
FRAME_BYTES = 960
"""The VAD's 30 ms frame, 16 kHz s16le."""


def _form(data: bytes, filename: str = "a.wav", **fields: str | list[str]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    for name, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            form.add_field(name, v)
    form.add_field("file", data, filename=filename, content_type="application/octet-stream")
    return form


def test_the_fixture_is_deterministic_and_laid_out_as_asked() -> None:
    again, bursts = long_tones(7, 1.0)
    assert again == WAV and bursts == BURSTS and long_tones(8, 1.0)[1] != BURSTS
    with wave.open(io.BytesIO(WAV)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, RATE, 60 * RATE)
    assert all(1.5 <= b.end - b.start <= 8.0 for b in BURSTS)
    assert all(0.6 <= b - a <= 2.5 for a, b in silences(BURSTS, 60.0)[:-1])  # the last one fills to the minute


def test_webrtc_vad_hears_every_word_as_speech_and_the_silences_as_silence() -> None:
    """What the splitter cuts by: were a burst silence to the VAD, the gateway would cut inside it. Each word
    after a second of the silences' noise, with a fresh VAD (its state as a file starts), then a 12-minute file
    (test_long_audio's) with one VAD all along (it adapts as it goes)."""
    for word in WORDS:
        vad = webrtcvad.Vad(MODE)
        pcm = quiet(RATE) + buzz(2 * RATE, word)
        heard = [vad.is_speech(pcm[i : i + FRAME_BYTES], RATE) for i in range(0, len(pcm), FRAME_BYTES)]
        assert not any(heard[:33]) and all(heard[35:]), word
    vad, pcm, errors = webrtcvad.Vad(MODE), bytearray(), 0
    for piece, burst in layout(1, 12):
        start = len(pcm)
        pcm += piece
        for i in range(start // FRAME_BYTES + 2, len(pcm) // FRAME_BYTES):  # whole frames of this piece, from its third
            if (burst is not None) != vad.is_speech(pcm[i * FRAME_BYTES : (i + 1) * FRAME_BYTES], RATE):
                errors += burst is not None or i >= start // FRAME_BYTES + 6  # a silence's first frames: the hangover
    assert errors == 0


async def test_it_hears_each_burst_where_it_is_with_its_word() -> None:
    async with ToneTranscriber() as engine, aiohttp.ClientSession() as session:
        form = _form(WAV, response_format="verbose_json", **{"timestamp_granularities[]": ["word", "segment"]})
        async with session.post(f"{engine.url}/audio/transcriptions", data=form) as resp:
            assert resp.status == 200
            body = await resp.json()
    assert [s["text"] for s in body["segments"]] == [f" {b.word}" for b in BURSTS]
    for got, want in zip(body["segments"], BURSTS, strict=True):
        assert abs(got["start"] - want.start) <= 0.05 and abs(got["end"] - want.end) <= 0.05, (got, want)
    assert [w["word"] for w in body["words"]] == [b.word for b in BURSTS]
    assert body["duration"] == 60.0 and body["task"] == "transcribe" and body["language"] == "english"
    assert [s["id"] for s in body["segments"]] == list(range(len(BURSTS)))
    heard = engine.heard[-1]
    assert heard.size == len(WAV) and heard.duration == 60.0
    assert max(heard.head_rms, heard.tail_rms) < QUIET_RMS  # the fixture starts and ends in silence
    assert ("response_format", "verbose_json") in heard.form


async def test_any_format_is_decoded_and_srt_translations_name_the_same_words() -> None:
    flac = encode(WAV[44:], RATE, "flac", "flac")
    async with ToneTranscriber() as engine, aiohttp.ClientSession() as session:
        async with session.post(f"{engine.url}/audio/translations",
                                data=_form(flac, "a.flac", response_format="srt")) as resp:
            assert resp.status == 200
            cues = list(srt.parse(await resp.text()))
    assert [c.content for c in cues] == [b.word for b in BURSTS]
    assert all(abs(c.start.total_seconds() - b.start) <= 0.05 for c, b in zip(cues, BURSTS, strict=True))
    assert engine.heard[-1].path == "/v1/audio/translations" and engine.heard[-1].size == len(flac)


async def test_a_file_over_max_audio_s_is_openais_400_and_counted() -> None:
    async with ToneTranscriber(max_audio_s=30) as engine, aiohttp.ClientSession() as session:
        async with session.post(f"{engine.url}/audio/transcriptions", data=_form(WAV)) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        short = WAV[:44] + WAV[44 : 44 + 2 * 30 * RATE]  # the header's sizes are wrong; the reader copes
        async with session.post(f"{engine.url}/audio/transcriptions", data=_form(short)) as resp:
            assert resp.status == 200
            assert json.loads(await resp.read())["text"] == " ".join(b.word for b in BURSTS if b.start < 30)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "file", "invalid_value")
    assert "longer than 30 seconds" in error["message"]
    assert engine.too_long == 1 and [h.answered for h in engine.heard] == [400, 200]


@pytest.mark.parametrize("mode", ["500", "503"])
async def test_fail_next_answers_a_5xx_once(mode: str) -> None:
    async with ToneTranscriber() as engine, aiohttp.ClientSession() as session:
        engine.mode, engine.fail_next = mode, 1
        statuses = []
        for _ in range(2):
            async with session.post(f"{engine.url}/audio/transcriptions", data=_form(WAV)) as resp:
                statuses.append(resp.status)
    assert statuses == [int(mode), 200]
