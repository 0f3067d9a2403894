"""Stitch per-chunk transcripts of one long upload back onto the upload's own timeline (issue 15, point 4).

Long audio is cut at silences into chunks that fit a backend's limit; each chunk is transcribed on its own, its
times starting at 0. The long-audio handler (the next step of issue 15, not wired yet) calls `stitch` with each
chunk's offset in the file (gateway.audio.splitter's `Chunk.start_s`: chunks there are contiguous, as assumed
here) and its Transcript, and renders the result with gateway.transcript_formats like any other transcript;
`stitch_diarized` does the same for `diarized_json` bodies relayed from a backend; `InOrder` turns chunks
completing out of order into `transcript.text.delta` texts in file order for `stream=true`.

Rules (pinned in tests/test_transcript_stitch.py):
- Chunk k owns [offset k, offset k+1) (the last one up to `duration`): its segment and word times are shifted by
  its offset and clamped to that span, so padding that overlaps the next chunk never lets times run backwards, and
  every time is inside the file. Offsets must be finite, >= 0 and non-decreasing (ValueError otherwise: they come
  from the gateway's own splitter, so a bad one is a bug, never a client's input); an offset past `duration` is
  clamped to it.
- Text: each chunk's text with its whitespace collapsed, chunks joined with one space (also for scripts written
  without spaces: a cut falls at a silence). A chunk with no text and no words contributes nothing.
- Language: the most common among chunks that heard something, ties to the earliest chunk; None if none said.
- `duration` is the whole decoded file's and `decoded` is True, so usage bills the file's seconds once.
- Diarization: a backend labels the speakers of each chunk on its own ("A", "B", ...), so one voice can be "A" in
  one chunk and "B" in the next. Labels are therefore qualified by the chunk's 1-based number: "A" in chunk 2 is
  "2:A"; names the client passed as `known_speaker_names[]` are matched by the backend in every chunk and kept.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from gateway.transcript import Segment, Transcript, Word, seconds
from gateway.transcript_formats import full_text, segments


def stitch(parts: Sequence[tuple[float, Transcript]], duration: float) -> Transcript:
    """One transcript of the whole file from (offset in the file, transcript of the chunk) pairs in file order."""
    spans = chunk_spans([offset for offset, _ in parts], duration)
    texts: list[str] = []
    languages: list[str] = []
    segs: list[Segment] = []
    words: list[Word] = []
    for (lo, hi), (_, chunk) in zip(spans, parts, strict=True):
        text = _collapse(full_text(chunk))
        if not text:
            continue
        texts.append(text)
        if chunk.language and chunk.language.strip():
            languages.append(chunk.language.strip())
        # words grouped into segments in time order; a text-only chunk with no duration of its own is one
        # segment over its span, not a guess from its length
        own = replace(chunk, words=tuple(sorted(chunk.words, key=_start)), duration=chunk.duration or hi - lo)
        in_segments: list[Word] = []
        for seg in sorted(segments(own), key=lambda s: _shift(s.start, 0.0, math.inf)):
            start = _shift(seg.start, lo, hi)
            segs.append(replace(seg, start=start, end=max(start, _shift(seg.end, lo, hi)),
                                words=_shift_words(seg.words, lo, hi)))
            in_segments += segs[-1].words
        words += _shift_words(chunk.words, lo, hi) if chunk.words else sorted(in_segments, key=_order)
    language = Counter(languages).most_common(1)[0][0] if languages else None
    return Transcript(" ".join(texts), language, duration, tuple(segs), tuple(words), decoded=True)


def chunk_spans(offsets: Sequence[float], duration: float) -> list[tuple[float, float]]:
    """Each chunk's span on the file's timeline: from its offset to the next chunk's, the last to `duration`."""
    if isinstance(duration, bool) or not isinstance(duration, int | float) or not math.isfinite(duration) \
            or duration < 0:
        raise ValueError(f"not a duration: {duration!r}")
    starts: list[float] = []
    for offset in offsets:
        if isinstance(offset, bool) or not isinstance(offset, int | float) or not math.isfinite(offset) or offset < 0:
            raise ValueError(f"not a chunk offset: {offset!r}")
        if starts and offset < starts[-1]:
            raise ValueError(f"chunk offsets go backwards: {offset!r} after {starts[-1]!r}")
        starts.append(min(float(offset), float(duration)))
    ends = [*starts[1:], float(duration)] if starts else []
    return list(zip(starts, ends, strict=True))


def _shift(t: float, lo: float, hi: float) -> float:
    """A chunk's own time on the file's timeline, inside the chunk's span (a time that is no number: its start)."""
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        return lo
    return round(min(max(lo + t, lo), hi), 3)


def _start(w: Word) -> float:
    return _shift(w.start, 0.0, math.inf)


def _order(w: Word) -> tuple[float, float]:
    return w.start, w.end


def _shift_words(words: Sequence[Word], lo: float, hi: float) -> tuple[Word, ...]:
    shifted = [Word(w.word, start, max(start, _shift(w.end, lo, hi)))
               for w in words for start in (_shift(w.start, lo, hi),)]
    return tuple(sorted(shifted, key=_order))


def _collapse(text: str) -> str:
    return " ".join(text.split())


def stitch_diarized(parts: Sequence[tuple[float, Mapping[str, Any]]], duration: float,
                    known_speakers: Collection[str] = ()) -> dict[str, Any]:
    """One `diarized_json` body from (offset, the chunk's parsed diarized_json body) pairs in file order. Segments
    a backend sent malformed (not an object, a time that is no number, no text) are left out; ids are renumbered
    "seg_000", "seg_001", ...; chunk texts (turns joined by newlines in OpenAI's example) are joined by newlines."""
    spans = chunk_spans([offset for offset, _ in parts], duration)
    texts: list[str] = []
    out: list[dict[str, Any]] = []
    for number, ((lo, hi), (_, body)) in enumerate(zip(spans, parts, strict=True), 1):
        text = body.get("text") if isinstance(body, Mapping) else None
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
        raw = body.get("segments") if isinstance(body, Mapping) else None
        found = []
        for seg in raw if isinstance(raw, list) else []:
            try:
                start, end = seconds(seg["start"]), seconds(seg["end"])
                seg_text, speaker = seg["text"], seg.get("speaker")
            except (TypeError, KeyError, ValueError):
                continue
            if not isinstance(seg_text, str) or not seg_text.strip():
                continue
            label = speaker if isinstance(speaker, str) and speaker.strip() else "?"
            if label not in known_speakers:
                label = f"{number}:{label}"
            s = _shift(start, lo, hi)
            found.append({"start": s, "end": max(s, _shift(end, lo, hi)), "text": seg_text, "speaker": label})
        out += sorted(found, key=lambda seg: seg["start"])
    segs = [{"type": "transcript.text.segment", "id": f"seg_{i:03d}", **seg} for i, seg in enumerate(out)]
    return {"task": "transcribe", "duration": float(duration), "text": "\n".join(texts), "segments": segs,
            "usage": {"type": "duration", "seconds": math.ceil(round(duration, 6))}}


class InOrder:
    """Chunk texts released in file order as chunks complete in any order, for `transcript.text.delta` events.

    `push(i, text)` records chunk i's text and returns the texts now releasable (chunk i and any buffered after
    it), each collapsed and prefixed with one space unless it is the first text released, so the released texts
    concatenated equal `stitch(...).text`; an empty chunk releases nothing. Bounded by `count`: an index outside
    0..count-1 or pushed twice is a ValueError (the caller's bug)."""

    def __init__(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"not a chunk count: {count!r}")
        self.count = count
        self.next = 0
        self._waiting: dict[int, str] = {}
        self._started = False

    def push(self, index: int, text: str) -> list[str]:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.count:
            raise ValueError(f"chunk {index!r} outside 0..{self.count - 1}")
        if index < self.next or index in self._waiting:
            raise ValueError(f"chunk {index} pushed twice")
        self._waiting[index] = text
        released = []
        while self.next in self._waiting:
            chunk = _collapse(self._waiting.pop(self.next))
            self.next += 1
            if chunk:
                released.append((" " if self._started else "") + chunk)
                self._started = True
        return released

    @property
    def done(self) -> bool:
        """Every chunk's text has been released."""
        return self.next == self.count
