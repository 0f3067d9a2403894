"""Engine errors: an HTTP engine's failure status and error body mapped onto gateway errors, the same way for every
engine:

    engine 401/403  -> 502, "the gateway's credential for backend X was refused" (never the credential)
    engine 429      -> 429 with the engine's Retry-After (1..MAX_RETRY_AFTER s); the next route is tried first
    engine 400/422  -> 400 with the engine's message and field, when it gave them
    engine 404      -> 502: the configured native model or path does not exist there
    engine 408/5xx  -> 502 (504 for 408/504: the engine itself timed out)

The message is found in every shape engines answer in: OpenAI's `{"error": {"message", "param", "code"}}`,
`{"error": "text"}`, FastAPI's `{"detail": "text"}`, `{"detail": {"message" | "error": {...}}}` and
`{"detail": [{"loc": [..., field], "msg"}]}`, ElevenLabs' `{"detail": {"status", "message"}}`, Deepgram's
`{"err_code", "err_msg"}`, Azure's `{"error": {"code", "message"}}`. It is always redacted (gateway.adapters.redact).
The field an engine names becomes the error's `param` only if it is (after the adapter's renames) a field of
OpenAI's request; anything else would point the client at a name it never sent. Errors no retry can fix say
so (`x-should-retry: false`), so the SDK does not send the same request three more times.

An adapter with engine-specific knowledge passes `fields` (its names -> OpenAI's) and a `refine` hook that may
turn a `Complaint` into a more precise error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from gateway.adapters.redact import redact
from gateway.config import Backend
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    RateLimitError,
    Reason,
    UpstreamError,
    UpstreamTimeoutError,
)

MAX_RETRY_AFTER = 300
"""Seconds: a backend's Retry-After longer than this (or `inf`) is cut to it; a client should not park for hours."""
OPENAI_FIELDS = frozenset({"model", "input", "voice", "instructions", "response_format", "speed", "stream_format",
                           "file", "language", "prompt", "temperature", "timestamp_granularities", "include",
                           "stream", "chunking_strategy", "known_speaker_names", "known_speaker_references"})
"""The request fields of OpenAI's audio endpoints: the only values `param` may take."""
_MAX_DEPTH = 4


@dataclass(frozen=True, slots=True)
class Complaint:
    """What an engine said, read from its error answer. `message` is redacted; `field` and `code` are the engine's
    own names (compared, never shown)."""

    status: int
    message: str | None = None
    field: str | None = None
    code: str | None = None
    retry_after: int = 1


Refine = Callable[[Complaint], GatewayError | None]
"""An adapter's own reading of a complaint; None leaves it to `error_for`."""


def complaint(backend: Backend, status: int, body: bytes, headers: Mapping[str, str]) -> Complaint:
    try:
        parsed: Any = json.loads(body)
    except (ValueError, RecursionError):  # not JSON (a proxy's HTML page) or nested past any need: no message
        parsed = None
    message, field, code = _read(parsed) if isinstance(parsed, dict | list) else (None, None, None)
    return Complaint(status, redact(backend, message) or None, field, code, retry_after(headers.get("Retry-After")))


def _read(node: Any, depth: int = 0) -> tuple[str | None, str | None, str | None]:
    """(message, field, code) from an error body or a part of it: the innermost message wins, with the
    nearest field and code around it."""
    if depth > _MAX_DEPTH:
        return None, None, None
    if isinstance(node, str | int | float) and not isinstance(node, bool):
        return str(node), None, None
    if isinstance(node, list):  # FastAPI's validation errors: the first one speaks for all
        return _read(node[0], depth + 1) if node else (None, None, None)
    if not isinstance(node, dict):
        return None, None, None
    field, code = _field(node), _text(node, "code", "err_code", "status", "type")
    for key in ("error", "detail", "errors"):
        inner = node.get(key)
        if inner not in (None, "", [], {}):
            message, inner_field, inner_code = _read(inner, depth + 1)
            if message:
                return message, inner_field or field, inner_code or code
    return _text(node, "message", "msg", "err_msg", "error_description", "title") or code, field, code


def _field(node: Mapping[str, Any]) -> str | None:
    """`param`, or the last name in FastAPI's `loc` (["body", "file"], ["query", "language"], [..., 0])."""
    param = node.get("param")
    if isinstance(param, str) and param:
        return param
    loc = node.get("loc")
    names = [x for x in loc if isinstance(x, str)] if isinstance(loc, list) else []
    return names[-1] if names and names[-1] not in ("body", "query") else None


def _text(node: Mapping[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = node.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def retry_after(value: str | None, now: datetime | None = None) -> int:
    """Whole seconds from a Retry-After of delta-seconds or an HTTP-date, within 1..MAX_RETRY_AFTER. A date in the
    past, a negative number, NaN or garbage is 1 (retry soon); `inf` or years ahead is MAX_RETRY_AFTER."""
    if not value:
        return 1
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError, OverflowError):
            return 1
        if when.tzinfo is None:  # `-0000` in RFC 5322: UTC, as HTTP-dates always are
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or seconds <= 0:
        return 1
    return min(MAX_RETRY_AFTER, math.ceil(seconds) if math.isfinite(seconds) else MAX_RETRY_AFTER)


def error_for(backend: Backend, said: Complaint, fields: Mapping[str, str] | None = None) -> GatewayError:
    """The gateway error for what the engine said. `fields` renames the engine's field (or error code, for
    engines that name the culprit that way) to OpenAI's."""
    name, status = backend.name, said.status
    if status in (401, 403):
        return UpstreamError(f"The gateway's credential for backend '{name}' was refused.",
                             reason=Reason.BACKEND_AUTH, should_retry=False)
    if status == 429:
        return RateLimitError(f"Backend '{name}' is rate limiting the gateway; retry later.",
                              retry_after=said.retry_after, reason=Reason.BACKEND_RATE_LIMIT)
    if status in (400, 413, 415, 422):
        return InvalidRequestError(f"Backend '{name}' rejected the request: {said.message or 'invalid request'}",
                                   param=openai_field(said, fields), reason=Reason.BACKEND_REJECTED)
    if status in (408, 504):
        return UpstreamTimeoutError(f"Backend '{name}' timed out.", reason=Reason.BACKEND_TIMEOUT)
    if status == 404:
        return UpstreamError(f"Backend '{name}' does not serve the configured model or path.",
                             reason=Reason.BACKEND_NOT_FOUND, should_retry=False)
    return UpstreamError(f"Backend '{name}' failed with status {status}.",
                         reason=Reason.BACKEND_5XX if status >= 500 else Reason.BACKEND_4XX)


def openai_field(said: Complaint, fields: Mapping[str, str] | None = None) -> str | None:
    """The OpenAI request field the engine blamed, or None when it blamed something a client cannot send."""
    renames = fields or {}
    named = [renames.get(said.code) if said.code else None, renames.get(said.field, said.field) if said.field else None]
    return next((name for name in named if name in OPENAI_FIELDS), None)
