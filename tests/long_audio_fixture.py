"""Long test audio whose transcript is known: "words" as tone bursts between silences (issue 15, long audio).

`long_tones(seed, minutes)` lays out bursts of 1.5-8 s and silences of 0.6-2.5 s, deterministically from the
seed, and returns the file (16 kHz mono WAV) with where each word is. tests/fakes/tone_transcriber.py hears
a burst's fundamental frequency (300 + 50 k Hz) as WORDS[k].

Why not pure sines: WebRTC's VAD (gateway/audio/splitter.py) hears a pure tone as speech at a few
frequencies and amplitudes only (at 8,000 peak: 300, 400, 450 and 900-1,000 Hz of 300-1,050 Hz; the others
are silence to it, so the gateway would cut inside them). A buzz of the fundamental and its next four
harmonics (1, 0.25, 0.15, 0.1, 0.05) at a 16,000 peak is speech to it at 300-850 Hz, and still crosses zero
exactly twice a period (the double counts crossings). At 900 and 950 Hz it is not, after faint noise (so
WORDS stops at 850 Hz). Checked (tests/test_tone_transcriber.py, and by hand on twelve 12-minute layouts and
the 200 MB benchmark's 104 minutes): every frame of a burst but its first two is speech to it, and every frame
of a silence but its first few (3-4: its hangover) is not.
"""

from __future__ import annotations

import functools
import math
import random
import textwrap
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tests.conftest import server_yaml
from tests.fakes.tone_transcriber import BASE_HZ, RATE, STEP_HZ, WORDS
from tests.support import wav_bytes

HARMONICS = (1.0, 0.25, 0.15, 0.1, 0.05)
PEAK = 16_000
NOISE = 20
"""The silences are not digital silence but a faint noise of -20, 0 and +20 (RMS 16, -66 dBFS): over digital
silence WebRTC's VAD, which adapts its noise model as it goes, takes more and more of the steady bursts for
noise (a tenth of their frames after 100 minutes: the 200 MB benchmark's file was cut inside bursts); over this
noise it hears every burst frame as speech for the whole 104 minutes, the first 3-4 silent frames after a burst
too (its hangover)."""
QUIET_RMS = 2 * NOISE
"""RMS under which a stretch of a file made here is silence (the noise's is 16, a burst's over 5,000)."""
BURST_S = (1.5, 8.0)
SILENCE_S = (0.6, 2.5)


class Burst(NamedTuple):
    start: float
    end: float
    word: str


@functools.cache
def _one_second(freq: int) -> bytes:
    """A second of the buzz at `freq` Hz (a whole number of periods: it tiles)."""
    wave = [sum(a * math.sin(2 * math.pi * (h + 1) * freq * i / RATE) for h, a in enumerate(HARMONICS))
            for i in range(RATE)]
    scale = PEAK / max(abs(s) for s in wave)
    return b"".join(int(s * scale).to_bytes(2, "little", signed=True) for s in wave)


@functools.cache
def _noise_second() -> bytes:
    rng = random.Random(0)
    return b"".join((NOISE * rng.randrange(-1, 2)).to_bytes(2, "little", signed=True) for _ in range(RATE))


def quiet(samples: int) -> bytes:
    """`samples` of the silences' faint noise."""
    return (_noise_second() * (samples // RATE + 1))[: 2 * samples]


def buzz(samples: int, word: str) -> bytes:
    """`samples` of the word's buzz, 16 kHz s16le."""
    second = _one_second(BASE_HZ + STEP_HZ * WORDS.index(word))
    return (second * (samples // RATE + 1))[: 2 * samples]


def layout(seed: int, minutes: float) -> Iterator[tuple[bytes, Burst | None]]:
    """The pieces of a `long_tones` file in order: 16 kHz s16le samples, and the burst they are (None: a
    silence)."""
    rng = random.Random(seed)
    total = round(minutes * 60 * 100)  # in 10 ms steps
    steps = lambda bounds: round(rng.uniform(*bounds) * 100)  # noqa: E731
    at = steps(SILENCE_S)
    yield quiet(at * RATE // 100), None
    while at + round(BURST_S[1] * 100) + round(SILENCE_S[1] * 100) < total:
        length, word = steps(BURST_S), rng.choice(WORDS)
        yield buzz(length * RATE // 100, word), Burst(at / 100, (at + length) / 100, word)
        at += length
        pause = steps(SILENCE_S)
        yield quiet(pause * RATE // 100), None
        at += pause
    yield quiet((total - at) * RATE // 100), None


def long_tones(seed: int, minutes: float) -> tuple[bytes, list[Burst]]:
    """A `minutes` long WAV (16 kHz mono s16le) of bursts and silences, and each burst's (start_s, end_s,
    word). It starts and ends in silence; every length is a whole number of 10 ms."""
    pieces = list(layout(seed, minutes))
    return wav_bytes(b"".join(p for p, _ in pieces), RATE), [b for _, b in pieces if b is not None]


def write_long_tones(path: Path, seed: int, minutes: float) -> list[Burst]:
    """`long_tones` written to `path` a piece at a time (a 200 MB file never whole in memory)."""
    bursts = []
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        for pcm, burst in layout(seed, minutes):
            w.writeframes(pcm)
            if burst is not None:
                bursts.append(burst)
    return bursts


def silences(bursts: list[Burst], duration: float) -> list[tuple[float, float]]:
    """(start, end) of every silence in a `long_tones` file `duration` long."""
    edges = [0.0, *(t for b in bursts for t in (b.start, b.end)), duration]
    return list(zip(edges[::2], edges[1::2], strict=True))


FRAME = 480
"""The splitter's 30 ms VAD frame (gateway/audio/splitter.py): every cut is on this grid."""
HANGOVER_FRAMES = 3
"""WebRTC's VAD goes on hearing speech for a few frames after a burst ends: with 3 or 4, `expected_cuts` agreed
with the splitter on all of fifteen 12-minute layouts (seeds 1-15), with 2 or 5 on 14 and 12."""


def expected_cuts(bursts: list[Burst], duration: float, limit_s: float, pad_s: float = 0.2) -> list[float]:
    """Where a splitter that cuts as late as it can within `limit_s`, in a silence with `pad_s` on both sides,
    cuts this layout (seconds): the chunk count, known from the layout alone."""
    limit, pad = int(limit_s * RATE) // FRAME, math.ceil(pad_s * RATE / FRAME)
    spans = [(math.ceil(a * RATE / FRAME) + HANGOVER_FRAMES + pad, math.floor(b * RATE / FRAME) - pad)
             for a, b in silences(bursts, duration)]
    cuts, start, total = [], 0, round(duration * RATE)
    while total - start * FRAME > limit * FRAME:
        start = max(min(hi, start + limit) for lo, hi in spans if lo <= min(hi, start + limit) and hi > start)
        cuts.append(start * FRAME / RATE)
    return cuts


LIMIT_S = 30.0
"""The tests' backend limit (`max_audio_s`): Whisper's window."""


def long_config(spool_dir: Path, *urls: str, extra: str = "", limit_s: float = LIMIT_S,
                max_upload_bytes: int = 40_000_000) -> str:
    """A gateway config: whisper-1 on one route per double (`tones0`, `tones1`, ...), each taking at most
    `limit_s` a request; uploads up to `max_upload_bytes`; `extra` YAML appended (dedented)."""
    backends = "".join(f"""
          tones{i}:
            kind: openai
            url: "{url}"
            timeout_s: 120
            max_audio_s: {limit_s:g}""" for i, url in enumerate(urls))
    routes = ", ".join(f"{{backend: tones{i}, model: tone-whisper}}" for i in range(len(urls)))
    text = textwrap.dedent(server_yaml(spool_dir) + f"""
        backends:{backends}
        models:
          whisper-1: {{task: transcription, routes: [{routes}]}}
    """) + textwrap.dedent(extra)
    assert "max_upload_bytes: 2000000\n" in text
    return text.replace("max_upload_bytes: 2000000\n", f"max_upload_bytes: {max_upload_bytes}\n")
