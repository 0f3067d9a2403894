"""OpenAI-shaped transcript JSON (`json`, `verbose_json`) read into a Transcript: what OpenAI answers, and what
servers modelled on it answer (whisper-asr-webservice dumps Whisper's own segments, as objects or as arrays).

Used by the whisper_asr adapter for its answers, and by long audio (gateway/handlers/long_audio.py) for a chunk an
OpenAI-compatible backend answered as JSON. Malformed input raises ValueError: the caller names the backend.
`normalized_body` applies gateway.transcript's normalization to a `json`/`verbose_json` body relayed as the server
wrote it (every field it does not touch kept, `tokens` included): an OpenAI-compatible server's words carry
punctuation and its `language` is a code where OpenAI's are bare words and an English name.
"""

from __future__ import annotations

import json
import math
from typing import Any

from gateway.languages import language_name
from gateway.transcript import Segment, Transcript, Word, bare, seconds, span


def parse_transcript(body: bytes) -> Transcript:
    """`{"text", "language"?, "segments"?, "words"?}` as a Transcript (an engine's own `duration` is never used:
    the gateway's measurement is what is billed and shown); ValueError if it is not one."""
    try:
        parsed = json.loads(body)  # NaN parses: a time that is no number is skipped or refused by `seconds`
        if not isinstance(parsed, dict) or not isinstance(parsed.get("text"), str):
            raise ValueError("not a transcript")
        raw_segments = parsed.get("segments") or []
        if not isinstance(raw_segments, list):
            raise ValueError("segments is not a list")
        segments = tuple(segment(s) for s in raw_segments)
        top_words = words(parsed.get("words"))
    except (TypeError, KeyError, IndexError, RecursionError) as exc:
        raise ValueError(f"not a transcript: {exc}") from None
    language = parsed.get("language")
    return Transcript(text=parsed["text"].strip(), segments=segments, words=top_words,
                      language=language if isinstance(language, str) and language else None)


def normalized_body(parsed: dict[str, Any]) -> bytes:
    """A parsed `json` or `verbose_json` body (an object with a `text`) as OpenAI writes one: text without
    surrounding spaces, `language` an English name, words bare with sane ordered times within `duration`,
    segments' times likewise; everything else as the server wrote it."""
    parsed["text"] = parsed["text"].strip()
    if isinstance(parsed.get("language"), str):
        parsed["language"] = language_name(parsed["language"])
    duration = parsed.get("duration")
    limit = float(duration) if isinstance(duration, int | float) and not isinstance(duration, bool) and \
        math.isfinite(duration) and duration >= 0 else math.inf
    for name in ("words", "segments"):
        items = parsed.get(name)
        if not isinstance(items, list):
            continue
        kept = []
        for item in items:
            if not isinstance(item, dict):
                continue
            if name == "words":
                if not isinstance(item.get("word"), str) or not (word := bare(item["word"])):
                    continue
                item["word"] = word
            item["start"], item["end"] = span(item.get("start"), item.get("end"), limit)
            kept.append(item)
        parsed[name] = sorted(kept, key=lambda item: item["start"])
    return json.dumps(parsed, ensure_ascii=False).encode()


def _number(value: Any, default: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else default


def segment(raw: Any) -> Segment:
    """A segment as the server dumps it: an object (faster-whisper >= 1.1 dataclass via asdict, openai-whisper,
    whisperX), or an array (faster-whisper < 1.1 NamedTuple, server <= 1.6: id, seek, start, end, text,
    tokens, temperature, avg_logprob, compression_ratio, no_speech_prob, words)."""
    if isinstance(raw, dict):
        fields = raw
    elif isinstance(raw, list) and len(raw) >= 5:
        names = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                 "compression_ratio", "no_speech_prob", "words")
        fields = dict(zip(names, raw, strict=False))
    else:
        raise ValueError("not a segment")
    text = fields["text"]
    if not isinstance(text, str):
        raise ValueError("segment text is not a string")
    start = seconds(fields["start"])
    return Segment(start=start, end=max(start, seconds(fields["end"])), text=text.strip(),
                   words=words(fields.get("words")),
                   avg_logprob=_number(fields.get("avg_logprob"), 0.0),
                   no_speech_prob=_number(fields.get("no_speech_prob"), 0.0),
                   temperature=_number(fields.get("temperature"), 0.0),
                   compression_ratio=_number(fields.get("compression_ratio"), 1.0))


def words(raw: Any) -> tuple[Word, ...]:
    """Words as objects {word, start, end, probability} or arrays [start, end, word, probability]. A word
    without timings (whisperX leaves digits unaligned) is skipped: the renderers time the text around it."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError("words is not a list")
    found = []
    for item in raw:
        if isinstance(item, dict):
            word, start, end = item.get("word"), item.get("start"), item.get("end")
        elif isinstance(item, list) and len(item) >= 3:
            start, end, word = item[0], item[1], item[2]
        else:
            raise ValueError("not a word")
        if not isinstance(word, str):
            raise ValueError("word is not a string")
        try:
            s = seconds(start)
            found.append(Word(word, s, max(s, seconds(end))))
        except ValueError:
            continue
    return tuple(found)

