"""Whether a transcription is split into chunks, and how: the routes' limits and the client's `chunking_strategy`.

An upload is split (gateway/handlers/long_audio.py) when
- it is longer than the smallest `max_audio_s`, or larger than the smallest `max_upload_bytes`, of its model's
  routes (a backend's own setting, else its kind's known limit: `Capabilities.limits`). Chunks are sized for the
  smallest limit, so that each can fail over to any route; or
- the client sent OpenAI's `chunking_strategy` and some route's engine does not cut audio itself
  (`Capabilities.chunking_strategy`, only the `openai` kind): the gateway emulates it with the same splitter, in
  chunks of at most the smallest limit or `long_audio.chunk_s`. Where every route cuts natively the field is
  forwarded and the upload sent whole (unless it is over a limit).

`chunking_strategy` is `auto` (the gateway's defaults) or a `server_vad` object, sent as bracket keys
(`chunking_strategy[type]` ...) as OpenAI's SDKs send it, or as JSON text. Its fields map onto the splitter:
`prefix_padding_ms` is the silence kept on each side of a cut, `silence_duration_ms` the shortest silence cut
in (besides twice the padding), and `threshold` picks WebRTC's aggressiveness: below 0.25 mode 1, below 0.5
mode 2, else 3 (the default 0.5 is mode 3, the splitter's own).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.audio.splitter import MODE, RATE, WAV_HEADER
from gateway.errors import InvalidRequestError
from gateway.settings import Limits, LongAudio
from gateway.table import Candidate

FIELD = "chunking_strategy"
_VAD_FIELDS = {"type", "threshold", "prefix_padding_ms", "silence_duration_ms"}
MAX_PADDING_MS = 5_000


@dataclass(frozen=True, slots=True)
class Strategy:
    """A client's `chunking_strategy`: how the splitter is to cut (None where the gateway's defaults hold)."""

    pad_s: float | None = None
    min_silence_s: float = 0.0
    mode: int = MODE


@dataclass(frozen=True, slots=True)
class Cut:
    """The splitter's settings for one request."""

    max_seconds: float
    max_bytes: int | None
    pad_s: float
    min_silence_s: float
    mode: int
    emulated: bool
    """Split for the client's `chunking_strategy`, which the chunks then do not carry."""

    def splitter_args(self) -> dict[str, Any]:
        return {"max_seconds": self.max_seconds, "max_bytes": self.max_bytes, "pad_s": self.pad_s,
                "min_silence_s": self.min_silence_s, "mode": self.mode}


def is_strategy_field(name: str) -> bool:
    return name == FIELD or (name.startswith(f"{FIELD}[") and name.endswith("]"))


def strategy(extra: Sequence[tuple[str, str]]) -> Strategy | None:
    """The client's `chunking_strategy` from the form's unknown fields, or None; a 400 on a malformed one."""
    whole = [value for name, value in extra if name == FIELD]
    parts = {name[len(FIELD) + 1:-1]: value for name, value in extra if is_strategy_field(name) and name != FIELD}
    if (whole and parts) or len(whole) > 1:
        raise _invalid("chunking_strategy was given more than once.")
    if whole:
        text = whole[0].strip()
        if text == "auto":
            return Strategy()
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            raise _invalid("chunking_strategy must be 'auto' or a server_vad object.") from None
        if parsed == "auto":
            return Strategy()
        if not isinstance(parsed, dict):
            raise _invalid("chunking_strategy must be 'auto' or a server_vad object.")
        parts = {str(k): v for k, v in parsed.items()}
    if not parts:
        return None
    for unknown in sorted(set(parts) - _VAD_FIELDS):
        raise _invalid(f"Unrecognized chunking_strategy field: {unknown[:64]}")
    if parts.get("type") != "server_vad":
        raise _invalid("chunking_strategy.type must be 'server_vad'.")
    threshold = _number(parts, "threshold", 0.5, 1.0)
    padding = _number(parts, "prefix_padding_ms", 300, MAX_PADDING_MS)
    silence = _number(parts, "silence_duration_ms", 200, 10_000)
    return Strategy(pad_s=padding / 1000, min_silence_s=silence / 1000, mode=1 if threshold < 0.25 else
                    2 if threshold < 0.5 else 3)


def _number(parts: dict[str, Any], name: str, default: float, maximum: float) -> float:
    value = parts.get(name, default)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 <= value <= maximum:
        raise _invalid(f"chunking_strategy.{name} must be a number from 0 to {maximum:g}.")
    return float(value)


def _invalid(message: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=FIELD, code="invalid_value")


def limits(candidate: Candidate, configured: Limits | None) -> Limits:
    """A route's limits: its backend's settings over its kind's."""
    return (configured or Limits()).over(candidate.adapter.capabilities.limits)


def limited(candidates: Sequence[Candidate], configured: Mapping[str, Limits], wanted: Strategy | None) -> bool:
    """Whether the upload's length decides anything (so it is measured before any route is called)."""
    return wanted is not None or any(
        limits(c, configured.get(c.route.backend)) != Limits() for c in candidates)


def plan(candidates: Sequence[Candidate], configured: Mapping[str, Limits], size: int, seconds: float,
         wanted: Strategy | None, settings: LongAudio) -> Cut | None:
    """How to split an upload of `size` bytes and `seconds`, or None: send it whole."""
    all_limits = [limits(c, configured.get(c.route.backend)) for c in candidates]
    max_s = min((lim.max_audio_s for lim in all_limits if lim.max_audio_s is not None), default=None)
    max_b = min((lim.max_upload_bytes for lim in all_limits if lim.max_upload_bytes is not None), default=None)
    over = (max_s is not None and seconds > max_s) or (max_b is not None and size > max_b)
    emulate = wanted is not None and not all(c.adapter.capabilities.chunking_strategy for c in candidates)
    if not (over or emulate):
        return None
    wanted = wanted or Strategy()
    pad = settings.pad_s if wanted.pad_s is None else wanted.pad_s
    chunk_s = max_s if max_s is not None else settings.chunk_s if emulate else math.inf
    if max_b is not None:
        chunk_s = min(chunk_s, (max_b - WAV_HEADER) / (2 * RATE))
    return Cut(chunk_s, max_b, pad, wanted.min_silence_s, wanted.mode, emulated=emulate)
