"""Realtime transcription (issue 16): time from the end of speech to `...transcription.completed` through the
emulation path (server VAD, each turn an item transcribed through the model's routes), against the same audio's
time through `POST /v1/audio/transcriptions` and through faster-whisper alone.

config/gateway.yaml (Piper, tiny.en) as a process of its own (tests/test_default_config.py's `serving`); Piper
speaks tests/test_realtime_embedded.py's sentences, placed between its silences, and a session streams them, paced
in real time in 100 ms appends, server VAD with 300 ms of padding and 500 ms of silence ending a turn. For each turn:
- voice end -> completed: from sending the append that holds the sentence's last voiced sample (what a speaker
  waits: the silence that ends the turn, the detector, the transcription, the events);
- turn end -> completed: from sending the append that holds the turn's end (`speech_stopped`'s `audio_end_ms`),
  which is when the gateway can know the turn is over;
- speech_stopped -> completed: from the client receiving `speech_stopped`.
Then the same turns' audio (speech_started to speech_stopped: what each item held), one at a time: appended at
once to a manual-commit session and committed (commit -> completed: the emulation path with no audio streaming in
meanwhile), as a WAV upload through the HTTP API (request -> response), and decoded and transcribed by
faster-whisper in this process with the backend's options (the engine alone). All of it ROUNDS times.

Run: .venv/bin/python -m pytest tests/perf/test_realtime_latency.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path
from typing import Any

import openai
import yaml

from gateway.adapters.faster_whisper import model_dir
from gateway.audio.splitter import wav
from tests.perf.perfkit import environment, median, pct, print_table
from tests.test_default_config import CONFIG, KEY, needs_engines, serving
from tests.test_realtime_embedded import (
    GAPS,
    MANUAL,
    RATE,
    SENTENCES,
    SILENCE_MS,
    Sent,
    pcm_of,
    speak,
    stream,
    vad_update,
)

ROUNDS = 3
COMPLETED = "conversation.item.input_audio_transcription.completed"


class Engine:
    """faster-whisper in this process, with the whisper backend's options from config/gateway.yaml."""

    def __init__(self) -> None:
        from faster_whisper import WhisperModel

        self.options = next(b for b in yaml.safe_load(CONFIG.read_text())["backends"].values()
                            if b["kind"] == "faster_whisper")
        self.model = WhisperModel(str(model_dir("whisper", self.options["model"])), device="cpu",
                                  compute_type=self.options.get("compute_type", "default"),
                                  cpu_threads=self.options.get("cpu_threads", 0), local_files_only=True)

    def time(self, data: bytes) -> float:
        """Seconds to decode and transcribe a WAV file, as the adapter does for an upload."""
        from faster_whisper import decode_audio

        t = time.perf_counter()
        segments, _ = self.model.transcribe(decode_audio(io.BytesIO(data)), language="en",
                                            beam_size=self.options.get("beam_size", 5),
                                            vad_filter=self.options.get("vad_filter", False))
        list(segments)
        return time.perf_counter() - t


async def commit_each(base_url: str, turns: list[bytes]) -> list[float]:
    """One manual-commit session: each turn's audio appended at once, then committed; seconds from sending the
    commit to `completed` (the emulation path with no audio streaming in meanwhile)."""
    took = []
    step = 2 * RATE // 10
    async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0) as client, \
            client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        await conn.session.update(session=MANUAL)
        for pcm in turns:
            for i in range(0, len(pcm), step):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())
            t = time.perf_counter()
            await conn.input_audio_buffer.commit()
            while (event := await asyncio.wait_for(conn.recv(), 60)).type != COMPLETED:
                assert event.type != "error" and not event.type.endswith(".failed"), event
            took.append(time.perf_counter() - t)
    return took


def latencies(sent: Sent, spans: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Per turn, seconds to `completed` from the three ends of speech (see the module's docstring)."""
    done, stopped = sent.at(COMPLETED), sent.at("input_audio_buffer.speech_stopped")
    ends = {e.item_id: e.audio_end_ms for e in sent.of("input_audio_buffer.speech_stopped")}
    items = [e.item_id for e in sent.of("input_audio_buffer.speech_started")]
    assert len(items) == len(spans), items
    found: dict[str, list[float]] = {"voice end": [], "turn end": [], "speech_stopped": []}
    for item, (_, voice_end) in zip(items, spans, strict=True):
        found["voice end"].append(done[item] - sent.sent_at(voice_end * 1000))
        found["turn end"].append(done[item] - sent.sent_at(ends[item] - 1))
        found["speech_stopped"].append(done[item] - stopped[item])
    return found


@needs_engines
def test_end_of_speech_to_completed_against_the_engines_own_time(tmp_path: Path) -> None:
    """ROUNDS times: a session, then its turns committed by hand in another, then each through the HTTP API and
    through the engine alone (so that the machine's other work weighs on them alike)."""
    engine = Engine()
    realtime: dict[str, list[float]] = {}
    http: list[float] = []
    alone: list[float] = []
    committed: list[float] = []
    seconds: list[float] = []
    with serving(CONFIG, tmp_path / "gateway.log", timeout=60) as client:
        placed = speak(client, SENTENCES, GAPS)
        pcm = pcm_of(placed)
        for _ in range(ROUNDS):
            sent = asyncio.run(stream(str(client.base_url), pcm, vad_update(), within=60 + len(pcm) / 2 / RATE))
            for name, values in latencies(sent, placed.spans).items():
                realtime.setdefault(name, []).extend(values)
            starts = [e.audio_start_ms for e in sent.of("input_audio_buffer.speech_started")]
            stops = [e.audio_end_ms for e in sent.of("input_audio_buffer.speech_stopped")]
            turns = [pcm[2 * (a * RATE // 1000): 2 * (b * RATE // 1000)] for a, b in zip(starts, stops, strict=True)]
            committed.extend(asyncio.run(commit_each(str(client.base_url), turns)))
            for turn in turns:
                data = wav(turn, len(turn) // 2, RATE)
                seconds.append(len(turn) / 2 / RATE)
                t = time.perf_counter()
                client.audio.transcriptions.create(model="whisper-1", file=("turn.wav", data, "audio/wav"),
                                                   language="en")
                http.append(time.perf_counter() - t)
                alone.append(engine.time(data))
    rows: list[list[Any]] = [[f"realtime: {name} -> completed", median(v) * 1000, pct(v, 90) * 1000, max(v) * 1000]
                             for name, v in realtime.items()]
    rows += [["realtime: a manual commit of the turn -> completed", median(committed) * 1000,
              pct(committed, 90) * 1000, max(committed) * 1000],
             ["POST /v1/audio/transcriptions (the turn's WAV)", median(http) * 1000, pct(http, 90) * 1000,
              max(http) * 1000],
             ["faster-whisper alone (decode + transcribe)", median(alone) * 1000, pct(alone, 90) * 1000,
              max(alone) * 1000]]
    print_table(f"End of speech to completed, {len(seconds)} turns of {min(seconds):.1f}-{max(seconds):.1f} s "
                f"(median {median(seconds):.1f} s), tiny.en int8, silence_duration_ms {SILENCE_MS}",
                ["path", "median ms", "p90 ms", "max ms"], rows, note=environment())
    assert median(realtime["speech_stopped"]) < 3 * median(http), "the emulation path takes 3 x the upload"
