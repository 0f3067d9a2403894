"""Render a Transcript as every OpenAI transcript response format: json, text, verbose_json, srt, vtt.

One place decides how segments are made when an engine gives only words or only text, how
subtitle cues are timed and wrapped, and how languages are named, so every endpoint answers alike.
Word timestamps are the engine's or none: a text-only engine's transcript is one segment spanning the
clip, its cues spread over it by characters, an estimate documented per kind in docs/backends.md; the
routes never send such an engine a request for words (gateway/handlers/transcribe.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.languages import language_name
from gateway.transcript import Segment, Transcript, Word

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
JSON_TYPE = "application/json"
TEXT_TYPE = "text/plain; charset=utf-8"


SENTENCE_END = ".?!\u3002\uff1f\uff01\u2026"  # . ? ! and the CJK full stop, question and exclamation marks, …
CLOSERS = "\"'\u201d\u2019\u00bb)]"  # closing quotes and brackets after a sentence's end
PAUSE_S, MAX_SEGMENT_S, MAX_SEGMENT_WORDS = 0.8, 15.0, 40
LINE_CHARS, CUE_LINES = 42, 2
CHARS_PER_S = 15.0  # speaking-rate guess for a text-only transcript with no duration


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    content_type: str
    text: str  # the transcript text returned (for metering: characters of text returned)


def render(
    transcript: Transcript,
    response_format: str,
    *,
    task: str = "transcribe",
    granularities: tuple[str, ...] = ("segment",),
) -> Rendered:
    """The response body for `response_format` (one of FORMATS); ValueError for anything else."""
    if task not in ("transcribe", "translate"):
        raise ValueError(f"unknown task {task!r}")
    text = full_text(transcript)
    if response_format == "json":
        body: dict[str, object] = {"text": text}
        if task == "transcribe" and transcript.duration is not None:
            body["usage"] = _usage(transcript.duration)
        return _json(body, text)
    if response_format == "text":
        return Rendered((text + "\n").encode(), TEXT_TYPE, text)
    if response_format == "verbose_json":
        return _json(_verbose(transcript, text, task, granularities), text)
    if response_format == "srt":
        cues = "".join(f"{i}\n{_ts(s, ',')} --> {_ts(e, ',')}\n{t}\n\n"
                       for i, (s, e, t) in enumerate(make_cues(transcript), 1))
        return Rendered(cues.encode(), TEXT_TYPE, text)
    if response_format == "vtt":
        cues = "".join(f"{_ts(s, '.')} --> {_ts(e, '.')}\n{_vtt_escape(t)}\n\n"
                       for s, e, t in make_cues(transcript))
        return Rendered(("WEBVTT\n\n" + cues).encode(), TEXT_TYPE, text)
    raise ValueError(f"unknown response_format {response_format!r}")


def full_text(transcript: Transcript) -> str:
    """The transcript text, else the segments' or the words' text joined."""
    if transcript.text.strip():
        return transcript.text.strip()
    if any(s.text.strip() for s in transcript.segments):
        return " ".join(s.text.strip() for s in transcript.segments if s.text.strip())
    return _join_words(transcript.all_words())


def segments(transcript: Transcript) -> list[Segment]:
    """The transcript's segments; else words grouped into segments; else one segment of the whole text."""
    found = [s for s in transcript.segments if s.text.strip()]
    if found:
        return found
    words = [w for w in transcript.all_words() if w.word.strip()]
    text = full_text(transcript)
    if words:
        return _group(words, text)
    if not text:
        return []
    end = transcript.duration if transcript.duration else max(1.0, len(text) / CHARS_PER_S)
    return [Segment(0.0, end, text)]


def _group(words: list[Word], text: str) -> list[Segment]:
    """Words into segments, breaking after sentence punctuation, at pauses, and at length limits."""
    spans = _align(text, [w.word for w in words])
    groups: list[list[int]] = [[]]
    for i, w in enumerate(words):
        groups[-1].append(i)
        if i + 1 == len(words):
            break
        tail = (text[spans[i][0]:spans[i + 1][0]] if spans else w.word).strip().rstrip(CLOSERS)
        first = words[groups[-1][0]]
        if ((tail[-1:] and tail[-1] in SENTENCE_END)
                or words[i + 1].start - w.end > PAUSE_S
                or w.end - first.start >= MAX_SEGMENT_S or len(groups[-1]) >= MAX_SEGMENT_WORDS):
            groups.append([])
    out = []
    for g, idx in enumerate(groups):
        if spans:
            stop = spans[groups[g + 1][0]][0] if g + 1 < len(groups) else len(text)
            seg_text = text[spans[idx[0]][0] if g else 0:stop].strip()
        else:
            seg_text = _join_words([words[i] for i in idx])
        out.append(Segment(words[idx[0]].start, max(words[idx[-1]].end, words[idx[0]].start), seg_text,
                           tuple(words[i] for i in idx)))
    return out


def _verbose(t: Transcript, text: str, task: str, granularities: Sequence[str]) -> dict[str, object]:
    body: dict[str, object] = {
        "task": task,
        "language": "english" if task == "translate" else language_name(t.language),
        "duration": float(t.duration or 0.0),
        "text": text,
    }
    segs = segments(t) if text else []
    if task == "translate" or "segment" in granularities:
        body["segments"] = [{
            "id": i, "seek": round(_clamp(s.start, t) * 100), "start": _clamp(s.start, t),
            "end": max(_clamp(s.end, t), _clamp(s.start, t)), "text": " " + " ".join(s.text.split()),
            "tokens": [], "temperature": s.temperature, "avg_logprob": s.avg_logprob,
            "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob,
        } for i, s in enumerate(segs)]
    if task == "transcribe" and "word" in granularities:  # the engine's words only: never times made up
        words = [w for w in t.all_words() if w.word.strip()] if text else []
        body["words"] = [{"word": w.word.strip(), "start": _clamp(w.start, t),
                          "end": max(_clamp(w.end, t), _clamp(w.start, t))} for w in words]
    if task == "transcribe" and t.duration is not None:
        body["usage"] = _usage(t.duration)
    return body


def make_cues(transcript: Transcript) -> list[tuple[int, int, str]]:
    """Subtitle cues (start ms, end ms, text of at most CUE_LINES lines of ~LINE_CHARS), in order,
    not overlapping, each end after its start, inside the duration when it is known."""
    limit = round(transcript.duration * 1000) if transcript.duration else None
    limit = limit if limit and limit > 0 else None
    loose = [w for w in transcript.words if w.word.strip()]
    cues: list[tuple[int, int, str]] = []
    for seg in segments(transcript):
        text = " ".join(seg.text.split()).replace("-->", "->")
        words = seg.words or tuple(w for w in loose if seg.start <= (w.start + w.end) / 2 <= seg.end)
        clock = _clock(text, seg.start, seg.end, words)
        chunks = _chunks(text)
        for k, (offset, lines) in enumerate(chunks):
            start = seg.start if k == 0 else clock(offset)
            end = seg.end if k + 1 == len(chunks) else clock(chunks[k + 1][0])
            s, e = max(0, round(start * 1000)), round(end * 1000)
            if cues:
                s = max(s, cues[-1][1])
            if limit is not None:
                e = min(e, limit)
                if s >= limit and cues:  # no room left before the end: join the previous cue
                    ps, pe, pt = cues.pop()
                    cues.append((ps, pe, pt + "\n" + "\n".join(lines)))
                    continue
                s = min(s, limit - 1)
            cues.append((s, max(e, s + 1), "\n".join(lines)))
    return cues


def _chunks(text: str) -> list[tuple[int, list[str]]]:
    """`text` wrapped at LINE_CHARS into cues of CUE_LINES lines: (character offset, lines) each."""
    out: list[tuple[int, list[str]]] = []
    for m in re.finditer(r"\S+", text):
        word = m.group()
        if out and len(out[-1][1][-1]) + 1 + len(word) <= LINE_CHARS:
            out[-1][1][-1] += " " + word
        elif out and len(out[-1][1]) < CUE_LINES:
            out[-1][1].append(word)
        else:
            out.append((m.start(), [word]))
    return [(offset, _balance(lines)) for offset, lines in out]


def _balance(lines: list[str]) -> list[str]:
    """Two greedy lines re-split at the space that makes them most even (still within LINE_CHARS)."""
    if len(lines) != 2:
        return lines
    joined = " ".join(lines)
    cut = min((i for i, c in enumerate(joined) if c == " "), key=lambda i: max(i, len(joined) - i - 1))
    if max(cut, len(joined) - cut - 1) > max(map(len, lines)):
        return lines
    return [joined[:cut], joined[cut + 1:]]


def _clock(text: str, start: float, end: float, words: Sequence[Word]) -> Callable[[int], float]:
    """Time at a character offset of `text`: from aligned word timings, else spread evenly."""
    spans = _align(text, [w.word for w in words]) if words else None
    end = max(end, start)

    def at(offset: int) -> float:
        if spans:
            for (_, stop), w in zip(spans, words, strict=True):
                if stop > offset:
                    return min(max(w.start, start), end)
            return end
        return start + (end - start) * offset / max(len(text), 1)

    return at


def _align(text: str, words: Sequence[str]) -> list[tuple[int, int]] | None:
    """Character spans of `words` found in order in `text`; None if any is missing."""
    spans, pos = [], 0
    for word in words:
        word = word.strip()
        found = text.find(word, pos)
        if not word or found < 0:
            return None
        spans.append((found, found + len(word)))
        pos = found + len(word)
    return spans


def _join_words(words: Sequence[Word]) -> str:
    """Whisper-style words (" Hello", " world") concatenate; bare words join with spaces."""
    if any(w.word[:1].isspace() for w in words[1:]):
        return "".join(w.word for w in words).strip()
    return " ".join(w.word.strip() for w in words if w.word.strip())


def _clamp(x: float, t: Transcript) -> float:
    """A time to the millisecond, never past the duration (rounding the clamped time up could pass it)."""
    x = round(max(0.0, float(x)), 3)
    return min(x, t.duration) if t.duration else x


def _usage(duration: float) -> dict[str, object]:
    return {"type": "duration", "seconds": max(0, math.ceil(round(duration, 6)))}


def _json(body: dict[str, object], text: str) -> Rendered:
    return Rendered(json.dumps(body, ensure_ascii=False).encode(), JSON_TYPE, text)


def _ts(ms: int, sep: str) -> str:
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    return f"{h:02d}:{m:02d}:{rest // 1000:02d}{sep}{rest % 1000:03d}"


def _vtt_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# -- the text of a transcript an engine answered in a client format (for billing) ------------------------------

_SUBTITLE_NOISE = re.compile(r"^(WEBVTT.*|\d+|[\d:.,]+ --> [\d:.,]+.*)$")


def transcript_text(body: bytes, response_format: str) -> str:
    """The transcript text in a body an upstream answered in `response_format`."""
    text = body.decode("utf-8", errors="replace")
    if response_format in ("json", "verbose_json", "diarized_json"):
        try:
            value = json.loads(text).get("text", "")
        except (ValueError, AttributeError, RecursionError):
            return ""
        return value if isinstance(value, str) else ""
    if response_format in ("srt", "vtt"):
        lines = [line.strip() for line in text.splitlines()]
        return " ".join(line for line in lines if line and not _SUBTITLE_NOISE.match(line))
    return text


def sse_transcript_text(event: bytes) -> str | None:
    """The final text of a `transcript.text.done` SSE event, if `event` is one."""
    for line in event.splitlines():
        if line.startswith(b"data: "):
            try:
                data = json.loads(line[6:])
            except (ValueError, RecursionError):
                continue
            if isinstance(data, dict) and data.get("type") == "transcript.text.done":
                return str(data.get("text", ""))
    return None
