"""Sine tones as interleaved s16le, the test audio made here.

A tone of a whole number of hertz repeats every second, so one second is computed per (rate, frequency,
amplitude, channels) and repeated: minutes of audio cost what one second does.
"""

from __future__ import annotations

import array
import functools
import math


@functools.cache
def _one_second(rate: int, freq: int, amplitude: int, channels: int) -> bytes:
    samples = (int(amplitude * math.sin(2 * math.pi * freq * i / rate)) for i in range(rate))
    return array.array("h", (s for s in samples for _ in range(channels))).tobytes()


def tone(seconds: float, rate: int = 24_000, *, freq: int = 440, amplitude: int = 8000, channels: int = 1) -> bytes:
    """`seconds` of a `freq` Hz sine at `rate` Hz, each sample repeated on `channels` channels."""
    second = _one_second(rate, freq, amplitude, channels)
    size = int(seconds * rate) * 2 * channels
    return (second * -(-size // len(second)))[:size]
