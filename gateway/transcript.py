"""The transcript every adapter produces and every renderer reads: text, language, duration, segments, words."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def all_words(self) -> tuple[Word, ...]:
        """Words at transcript level, else gathered from the segments."""
        if self.words:
            return self.words
        return tuple(w for s in self.segments for w in s.words)
