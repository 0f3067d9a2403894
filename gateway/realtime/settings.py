"""A transcription session's configuration, as `session.update` sets it and `session.created`/`updated` show it.

OpenAI's rules (../shared/research/realtime-transcription.md section 2): only the fields present change, `null`
clears `transcription`, `noise_reduction` and `turn_detection`; anything invalid is one `error` event naming the
dotted `param`, and the whole update is discarded. Server VAD is on by default (200 ms of silence, OpenAI's observed
default). `semantic_vad` is served by the same VAD, its `eagerness` read as a silence length. `noise_reduction`
is accepted and shown, not applied (the engines behind hear the audio as sent).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from gateway.realtime.events import EventError

PCM, PCMU, PCMA = "audio/pcm", "audio/pcmu", "audio/pcma"
PCM_RATE, G711_RATE = 24_000, 8_000
LOGPROBS = "item.input_audio_transcription.logprobs"
MAX_PROMPT = 4096
MAX_PADDING_MS, MAX_SILENCE_MS = 5_000, 10_000
EAGERNESS_MS = {"low": 1_000, "medium": 500, "auto": 500, "high": 250}
"""semantic_vad's eagerness as the silence that ends a turn (OpenAI's own waits at most 8, 4 and 2 s)."""
_LANGUAGE = re.compile(r"^[a-z]{2}$")


@dataclass(frozen=True, slots=True)
class Transcription:
    model: str
    language: str | None = None
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class TurnDetection:
    type: str = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 200
    eagerness: str | None = None

    @property
    def silence_ms(self) -> int:
        return EAGERNESS_MS[self.eagerness or "auto"] if self.type == "semantic_vad" else self.silence_duration_ms


@dataclass(frozen=True, slots=True)
class Settings:
    format: str = PCM
    transcription: Transcription | None = None
    noise_reduction: dict[str, Any] | None = None
    turn_detection: TurnDetection | None = TurnDetection()
    include: tuple[str, ...] | None = None

    @property
    def rate(self) -> int:
        return PCM_RATE if self.format == PCM else G711_RATE

    def shown(self, session_id: str, expires_at: int) -> dict[str, Any]:
        """The session object of `session.created` and `session.updated`."""
        fmt: dict[str, Any] = {"type": self.format, **({"rate": PCM_RATE} if self.format == PCM else {})}
        t, vad = self.transcription, self.turn_detection
        turn: dict[str, Any] | None = None
        if vad is not None:
            turn = {"type": vad.type, "threshold": vad.threshold, "prefix_padding_ms": vad.prefix_padding_ms,
                    "silence_duration_ms": vad.silence_duration_ms}
            if vad.type == "semantic_vad":
                turn = {"type": vad.type, "eagerness": vad.eagerness or "auto"}
        return {"type": "transcription", "object": "realtime.transcription_session", "id": session_id,
                "expires_at": expires_at, "audio": {"input": {
                    "format": fmt,
                    "transcription": None if t is None else {"model": t.model, "language": t.language,
                                                             "prompt": t.prompt},
                    "noise_reduction": self.noise_reduction, "turn_detection": turn}},
                "include": list(self.include) if self.include is not None else None}


def apply(settings: Settings, session: Any) -> Settings:
    """`settings` changed by a `session.update`'s `session`; an EventError (nothing changed) if any of it is invalid."""
    node = _object(session, "session")
    _known(node, "session", {"type", "audio", "include"})
    if node.get("type") != "transcription":
        raise EventError("invalid_value", "Invalid value for 'session.type': this is a transcription session; "
                         "use 'transcription'.", "session.type")
    if "include" in node:
        settings = replace(settings, include=_include(node["include"]))
    if "audio" not in node:
        return settings
    audio = _object(node["audio"], "session.audio")
    _known(audio, "session.audio", {"input"})
    inp = _object(audio.get("input", {}), "session.audio.input")
    _known(inp, "session.audio.input", {"format", "transcription", "noise_reduction", "turn_detection"})
    path = "session.audio.input"
    if "format" in inp:
        settings = replace(settings, format=_format(inp["format"], f"{path}.format"))
    if "transcription" in inp:
        settings = replace(settings, transcription=_transcription(inp["transcription"], settings.transcription,
                                                                  f"{path}.transcription"))
    if "noise_reduction" in inp:
        settings = replace(settings, noise_reduction=_noise(inp["noise_reduction"], f"{path}.noise_reduction"))
    if "turn_detection" in inp:
        settings = replace(settings, turn_detection=_turn(inp["turn_detection"], settings.turn_detection,
                                                          f"{path}.turn_detection"))
    return settings


def _format(value: Any, path: str) -> str:
    node = _object(value, path)
    _known(node, path, {"type", "rate"})
    kind = _choice(node.get("type"), (PCM, PCMU, PCMA), f"{path}.type")
    if "rate" in node:
        rate = _number(node["rate"], f"{path}.rate", whole=True)
        wanted = PCM_RATE if kind == PCM else G711_RATE
        if rate != wanted:
            code = "integer_below_min_value" if rate < wanted else "integer_above_max_value"
            raise EventError(code, f"Invalid '{path}.rate': expected {wanted} for {kind}, got {rate:g}.",
                             f"{path}.rate")
    return kind


def _transcription(value: Any, was: Transcription | None, path: str) -> Transcription | None:
    if value is None:
        return None
    node = _object(value, path)
    _known(node, path, {"model", "language", "prompt", "languages", "keywords", "delay"})
    model = node.get("model", was.model if was else None)
    if not isinstance(model, str) or not model.strip() or len(model) > 256:
        raise EventError("invalid_value" if model is not None else "missing_required_parameter",
                         f"'{path}.model' must name a transcription model.", f"{path}.model")
    language = node.get("language", was.language if was else None)
    if language is not None and (not isinstance(language, str) or not _LANGUAGE.match(language)):
        raise EventError("invalid_language_format", "Invalid language: use an ISO-639-1 code such as 'en'.",
                         f"{path}.language")
    prompt = node.get("prompt", was.prompt if was else None)
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_PROMPT):
        raise EventError("invalid_value", f"'{path}.prompt' must be text of at most {MAX_PROMPT} characters.",
                         f"{path}.prompt")
    return Transcription(model.strip(), language, prompt or None)


def _noise(value: Any, path: str) -> dict[str, Any] | None:
    if value is None:
        return None
    node = _object(value, path)
    _known(node, path, {"type", "strength"})
    shown: dict[str, Any] = {"type": _choice(node.get("type"), ("near_field", "far_field"), f"{path}.type")}
    if "strength" in node:
        shown["strength"] = _number(node["strength"], f"{path}.strength", 0, 10)
    return shown


def _turn(value: Any, was: TurnDetection | None, path: str) -> TurnDetection | None:
    if value is None:
        return None
    node = _object(value, path)
    _known(node, path, {"type", "threshold", "prefix_padding_ms", "silence_duration_ms", "create_response",
                        "interrupt_response", "idle_timeout_ms", "eagerness"})
    d = was or TurnDetection()
    kind = _choice(node.get("type", d.type), ("server_vad", "semantic_vad"), f"{path}.type")
    for flag in ("create_response", "interrupt_response"):
        if flag in node and not isinstance(node[flag], bool):
            raise EventError("invalid_type", f"'{path}.{flag}' must be a boolean.", f"{path}.{flag}")
    if node.get("idle_timeout_ms") is not None:
        _number(node["idle_timeout_ms"], f"{path}.idle_timeout_ms", 0, 3_600_000, whole=True)
    eagerness = node.get("eagerness", d.eagerness)
    if eagerness is not None:
        eagerness = _choice(eagerness, tuple(EAGERNESS_MS), f"{path}.eagerness")
    return TurnDetection(
        kind, _number(node.get("threshold", d.threshold), f"{path}.threshold", 0, 1),
        int(_number(node.get("prefix_padding_ms", d.prefix_padding_ms), f"{path}.prefix_padding_ms", 0,
                    MAX_PADDING_MS, whole=True)),
        int(_number(node.get("silence_duration_ms", d.silence_duration_ms), f"{path}.silence_duration_ms", 0,
                    MAX_SILENCE_MS, whole=True)),
        eagerness)


def _include(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > 8:
        raise EventError("invalid_type", "'session.include' must be a list.", "session.include")
    return tuple(_choice(v, (LOGPROBS,), "session.include") for v in value)


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EventError("invalid_type", f"'{path}' must be an object.", path)
    return value


def _known(node: dict[str, Any], path: str, known: set[str]) -> None:
    for key in node:
        if key not in known:
            shown = key[:64] if isinstance(key, str) else "?"
            raise EventError("unknown_parameter", f"Unknown parameter: '{path}.{shown}'.", f"{path}.{shown}")


def _choice(value: Any, allowed: tuple[str, ...], path: str) -> str:
    if value not in allowed or not isinstance(value, str):
        raise EventError("invalid_value", f"Invalid value for '{path}'. Supported values are: "
                         + ", ".join(f"'{a}'" for a in allowed) + ".", path)
    return value


def _number(value: Any, path: str, low: float = -math.inf, high: float = math.inf, *, whole: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise EventError("invalid_type", f"'{path}' must be a number.", path)
    if whole and value != int(value):
        raise EventError("invalid_type", f"'{path}' must be an integer.", path)
    if value < low:
        raise EventError("integer_below_min_value" if whole else "decimal_below_min_value",
                         f"Invalid '{path}': expected a value >= {low:g}, got {value:g}.", path)
    if value > high:
        raise EventError("integer_above_max_value" if whole else "decimal_above_max_value",
                         f"Invalid '{path}': expected a value <= {high:g}, got {value:g}.", path)
    return value
