"""What a finished request is billed: its units and cost, computed once, in this one place.

    speech         characters of `input` (Unicode code points) + seconds of audio produced
    transcription  seconds of input audio (measured from the decoded upload) + characters of text returned
    translation    the same as transcription

Only a request that completed successfully is billable. A speech stream the client abandoned
midway is recorded with the units actually delivered and `completed: false`, and is not billed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from gateway.config import Price
from gateway.outcome import Outcome

SPEECH_ENDPOINT = "/v1/audio/speech"
TRANSCRIPT_ENDPOINTS = ("/v1/audio/transcriptions", "/v1/audio/translations")


@dataclass(frozen=True, slots=True)
class Bill:
    characters: int
    audio_seconds: float
    cost_usd: float | None
    billable: bool
    completed: bool


def bill(outcome: Outcome, status: int, price: Price | None) -> Bill:
    if outcome.endpoint == SPEECH_ENDPOINT:
        characters, seconds = outcome.input_chars, outcome.output_audio_seconds
    elif outcome.endpoint in TRANSCRIPT_ENDPOINTS:
        characters, seconds = outcome.output_text_chars, outcome.input_audio_seconds or 0.0
    else:
        return Bill(0, 0.0, None, billable=False, completed=status < 400)
    completed = outcome.completed and 200 <= status < 300 and outcome.failed_after_first_byte is None
    if not completed and outcome.first_byte_at is None:
        characters, seconds = 0, 0.0  # nothing reached the client
    cost = None
    if price is not None:
        cost = characters / 1_000_000 * price.per_million_characters + seconds / 60 * price.per_audio_minute
    return Bill(characters, round(seconds, 3), cost, billable=completed, completed=completed)


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


def sse_transcript_chars(event: bytes) -> int | None:
    """Characters of the final text in a `transcript.text.done` SSE event, if `event` is one."""
    for line in event.splitlines():
        if line.startswith(b"data: "):
            try:
                data = json.loads(line[6:])
            except (ValueError, RecursionError):
                continue
            if isinstance(data, dict) and data.get("type") == "transcript.text.done":
                return len(str(data.get("text", "")).strip())
    return None
