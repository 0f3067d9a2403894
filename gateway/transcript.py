"""The transcript every adapter produces and every renderer reads: text, language, duration, segments, words."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

WORD_PUNCT = ".,;:!?\"'()[]\u201c\u201d\u2018\u2019\u00ab\u00bb\u00bf\u00a1\u2026"
"""Punctuation trimmed off a word: OpenAI's words carry none (some engines' words do)."""


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Segment:
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    temperature: float = 0.0
    compression_ratio: float = 1.0


@dataclass(frozen=True, slots=True)
class Transcript:
    """What an engine heard. `language` is an ISO-639-1 code or an English name, or None if unknown;
    `duration` is seconds of input audio (the gateway fills it from the decoded upload when the
    engine does not say); `segments` may be empty (renderers then make one from `text`)."""

    text: str
    language: str | None = None
    duration: float | None = None
    segments: tuple[Segment, ...] = ()
    words: tuple[Word, ...] = field(default=())
    decoded: bool = False
    """`duration` is the gateway's own decode of the upload (the embedded engines, Wyoming), so billing may
    trust it over the upload's packet timestamps; an engine's own figure is never billed."""

    def all_words(self) -> tuple[Word, ...]:
        """Words at transcript level, else gathered from the segments."""
        if self.words:
            return self.words
        return tuple(w for s in self.segments for w in s.words)


def seconds(value: Any) -> float:
    """An engine's time as seconds a renderer can use: a finite number, at least 0. Anything else (NaN and
    Infinity parse from JSON, strings, booleans) raises ValueError, so that each adapter decides whether to
    skip the item or call the answer malformed, instead of a renderer failing or writing `NaN` into JSON."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"not a time: {value!r}")
    return max(0.0, float(value))
