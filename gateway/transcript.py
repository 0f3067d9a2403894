"""The transcript every adapter produces and every renderer reads: text, language, duration, segments, words.

Adapters hand over what their engine said; `normalize` makes it what OpenAI returns, in this one place (the
transcription handler applies it before rendering, a long upload's stitched transcript included; a JSON
transcript an OpenAI-compatible server wrote itself gets the same rules, gateway/transcript_json.py): words
bare (OpenAI's carry no punctuation; Deepgram's `punctuated_word`, Azure's and Scribe's words and Whisper's
`" Americans,"` do), every time a finite number of seconds, at least 0, an end never before its start, within
the audio's duration when it is known, words and segments in time order. Texts keep their punctuation;
languages are named by the renderer (gateway/languages.py).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any


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


def bare(word: str) -> str:
    """`word` as OpenAI's words are: no whitespace or punctuation around it (Unicode categories Z, P and C);
    apostrophes and hyphens inside it stay ("don't", "well-known"). Empty when it was punctuation only."""
    start, end = 0, len(word)
    while start < end and unicodedata.category(word[start])[0] in "ZPC":
        start += 1
    while end > start and unicodedata.category(word[end - 1])[0] in "ZPC":
        end -= 1
    return word[start:end]


def normalize(transcript: Transcript) -> Transcript:
    """The transcript with bare words and sane, ordered times (see the module docstring)."""
    limit = transcript.duration if transcript.duration is not None and math.isfinite(transcript.duration) \
        else math.inf
    segments = sorted((replace(s, start=start, end=end, text=s.text.strip(), words=_words(s.words, limit))
                       for s in transcript.segments for start, end in (span(s.start, s.end, limit),)),
                      key=lambda s: s.start)
    return replace(transcript, segments=tuple(segments), words=_words(transcript.words, limit))


def _words(words: tuple[Word, ...], limit: float) -> tuple[Word, ...]:
    kept = [Word(text, *span(w.start, w.end, limit)) for w in words if (text := bare(w.word))]
    return tuple(sorted(kept, key=lambda w: w.start))


def span(start: Any, end: Any, limit: float) -> tuple[float, float]:
    """(start, end) finite, 0 <= start <= end <= limit; a time that is no number is taken as its neighbour."""
    start = start if _finite(start) else (end if _finite(end) else 0.0)
    end = end if _finite(end) else start
    start = min(max(0.0, float(start)), limit)
    return start, min(max(start, float(end)), limit)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
