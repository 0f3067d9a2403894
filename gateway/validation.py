"""OpenAI's field rules for the audio endpoints: types, enums, ranges, lengths, with OpenAI's messages.

Each rule raises InvalidRequestError naming the field (`param`) and a code such as
`missing_required_parameter`, `invalid_type`, `invalid_value` or `string_above_max_length`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gateway.audio.formats import SPEECH_FORMATS
from gateway.errors import InvalidRequestError

MAX_TEXT = 4096
SPEED_RANGE = (0.25, 4.0)
STREAM_FORMATS = ("audio", "sse")
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
TRANSCRIPTION_ONLY_FORMATS = ("diarized_json",)
GRANULARITIES = ("word", "segment")
INCLUDES = ("logprobs",)
TRANSLATION_FIELDS = frozenset({"file", "model", "prompt", "response_format", "temperature"})
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?$")
_JSON_TYPE = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
              dict: "an object", type(None): "null"}


def _missing(name: str) -> InvalidRequestError:
    return InvalidRequestError(f"Missing required parameter: '{name}'.", param=name,
                               code="missing_required_parameter")


def _wrong_type(name: str, expected: str, value: Any) -> InvalidRequestError:
    got = _JSON_TYPE.get(type(value), type(value).__name__)
    return InvalidRequestError(f"Invalid type for '{name}': expected {expected}, but got {got} instead.",
                               param=name, code="invalid_type")


def _one_of(name: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        listed = ", ".join(f"'{a}'" for a in allowed)
        raise InvalidRequestError(f"Invalid value: '{value}'. Supported values are: {listed}.",
                                  param=name, code="invalid_value")
    return value


def _text(name: str, value: Any, *, required: bool) -> str | None:
    if value is None:
        if required:
            raise _missing(name)
        return None
    if not isinstance(value, str):
        raise _wrong_type(name, "a string", value)
    if required and not value:
        raise InvalidRequestError(
            f"Invalid '{name}': string too short. Expected a string with minimum length 1, "
            "but got an empty string instead.", param=name, code="string_below_min_length")
    if len(value) > MAX_TEXT:
        raise InvalidRequestError(
            f"Invalid '{name}': string too long. Expected a string with maximum length {MAX_TEXT}, "
            f"but got a string with length {len(value)} instead.", param=name, code="string_above_max_length")
    return value


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong_type(name, "a number", value)
    if not math.isfinite(value):  # NaN passes both range checks below; no engine can use it
        raise InvalidRequestError(f"Invalid '{name}': expected a finite number, but got {value} instead.",
                                  param=name, code="invalid_value")
    if value < low:
        raise InvalidRequestError(f"Invalid '{name}': decimal below minimum value. Expected a value >= {low}, "
                                  f"but got {value} instead.", param=name, code="decimal_below_min_value")
    if value > high:
        raise InvalidRequestError(f"Invalid '{name}': decimal above maximum value. Expected a value <= {high}, "
                                  f"but got {value} instead.", param=name, code="decimal_above_max_value")
    return float(value)


@dataclass(frozen=True, slots=True)
class SpeechRequest:
    model: str
    input: str
    voice: str
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"
    instructions: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_SPEECH_FIELDS = {"model", "input", "voice", "instructions", "response_format", "speed", "stream_format"}


def validate_speech(body: Any) -> SpeechRequest:
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_type")
    model = _text("model", body.get("model"), required=True)
    text = _text("input", body.get("input"), required=True)
    voice = body.get("voice")
    if isinstance(voice, dict):
        if set(voice) != {"id"}:
            raise InvalidRequestError("Invalid 'voice': a custom voice is an object with only 'id'.",
                                      param="voice", code="invalid_value")
        voice = voice["id"]
    voice = _text("voice", voice, required=True)
    fmt = body.get("response_format")
    fmt = _one_of("response_format", _text("response_format", fmt, required=False) or "mp3", SPEECH_FORMATS)
    stream_format = _text("stream_format", body.get("stream_format"), required=False) or "audio"
    speed = body.get("speed")
    return SpeechRequest(
        model=model or "",
        input=text or "",
        voice=voice or "",
        response_format=fmt,
        speed=1.0 if speed is None else _number("speed", speed, *SPEED_RANGE),
        stream_format=_one_of("stream_format", stream_format, STREAM_FORMATS),
        instructions=_text("instructions", body.get("instructions"), required=False),
        extra={k: v for k, v in body.items() if k not in _SPEECH_FIELDS},
    )


@dataclass(frozen=True, slots=True)
class TranscriptionRequest:
    task: str
    model: str
    response_format: str = "json"
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    timestamp_granularities: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    stream: bool = False
    extra: tuple[tuple[str, str], ...] = ()


_KNOWN_FORM_FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature",
                      "timestamp_granularities", "include", "stream"}


def _form_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0", ""):
        return False
    raise _wrong_type(name, "a boolean", value)


def _form_number(name: str, value: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _wrong_type(name, "a number", value) from None
    return _number(name, number, low, high)


def validate_transcription(fields: list[tuple[str, str]], task: str, has_file: bool) -> TranscriptionRequest:
    """Validate multipart text fields as sent: arrays as repeated `name[]` (or bare `name`) parts,
    booleans and numbers as text. Unknown fields are kept, with their names as sent, in `extra`."""
    single: dict[str, str] = {}
    arrays: dict[str, list[str]] = {}
    extra: list[tuple[str, str]] = []
    for raw_name, value in fields:
        name = raw_name.removesuffix("[]")
        if name not in _KNOWN_FORM_FIELDS:
            extra.append((raw_name, value))
            continue
        if task == "translate" and name in _KNOWN_FORM_FIELDS and name not in TRANSLATION_FIELDS:
            raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name,
                                      code="unknown_parameter")
        if name in ("timestamp_granularities", "include"):
            arrays.setdefault(name, []).append(value)
        else:
            single[name] = value
    if "model" not in single or not single["model"].strip():
        raise _missing("model")
    if not has_file:
        raise _missing("file")
    allowed = TRANSCRIPT_FORMATS + (TRANSCRIPTION_ONLY_FORMATS if task == "transcribe" else ())
    fmt = _one_of("response_format", single.get("response_format") or "json", allowed)
    granularities = tuple(_one_of("timestamp_granularities", g, GRANULARITIES)
                          for g in arrays.get("timestamp_granularities", []))
    if granularities and fmt != "verbose_json":
        raise InvalidRequestError("timestamp_granularities[] is only supported with response_format "
                                  "verbose_json.", param="timestamp_granularities", code="invalid_value")
    language = single.get("language") or None
    if language is not None and not _LANGUAGE.match(language):
        raise InvalidRequestError(f"Invalid language '{language}'. Language parameter must be specified "
                                  "in ISO-639-1 format.", param="language", code="invalid_language_format")
    temperature = single.get("temperature")
    return TranscriptionRequest(
        task=task,
        model=single["model"].strip(),
        response_format=fmt,
        language=language.lower() if language else None,
        prompt=_text("prompt", single.get("prompt"), required=False),
        temperature=None if temperature in (None, "") else _form_number("temperature", temperature, 0.0, 1.0),
        timestamp_granularities=granularities or (("segment",) if fmt == "verbose_json" else ()),
        include=tuple(_one_of("include", i, INCLUDES) for i in arrays.get("include", [])),
        stream=_form_bool("stream", single.get("stream", "false")),
        extra=tuple(extra),
    )
