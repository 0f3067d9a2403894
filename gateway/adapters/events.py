"""An engine's SSE stream, relayed event by event with the engine's error events redacted.

OpenAI-compatible engines stream speech (`speech.audio.delta`) and transcripts
(`transcript.text.delta`) as server-sent events, and report a failure mid-stream as an event with
an `error`. That error text is the engine's, so it goes through `redact` like every other engine
message. Events are re-framed whole (a blank line after each, LF line ends), so what follows can
read one event per chunk; one longer than MAX_EVENT_BYTES is garbage, not a reason to buffer forever.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

from gateway.adapters.redact import redact
from gateway.config import Backend
from gateway.errors import Reason, UpstreamError

MAX_EVENT_BYTES = 1_048_576
"""An event longer than this is garbage (a speech delta of 0.5 s of audio is about 32 KiB)."""
_EVENT_END = re.compile(rb"\r?\n\r?\n")


async def whole_events(backend: Backend, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`chunks` of an SSE body as whole events, each ending in a blank line; error events redacted."""
    pending = b""
    try:
        async for chunk in chunks:
            pending += chunk
            complete: list[bytes] = []
            if _EVENT_END.search(pending, max(0, len(pending) - len(chunk) - 3)):  # only new bytes can end an event
                *complete, pending = _EVENT_END.split(pending)
            if len(pending) > MAX_EVENT_BYTES:
                raise UpstreamError(f"Backend '{backend.name}' sent an oversized event.", reason=Reason.BAD_RESPONSE)
            for event in complete:
                if event.strip():
                    yield _redacted(backend, event) + b"\n\n"
        if pending.strip():  # the stream ended without the last blank line
            yield _redacted(backend, pending.rstrip(b"\r\n")) + b"\n\n"
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def _redacted(backend: Backend, event: bytes) -> bytes:
    if b"error" not in event:
        return event
    lines = event.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(b"data:"):
            try:
                data = json.loads(line[5:])
            except (ValueError, RecursionError):
                continue
            if isinstance(data, dict) and "error" in data:
                lines[i] = b"data: " + json.dumps(_redact_error(backend, data)).encode()
    return b"\n".join(lines)


def _redact_error(backend: Backend, data: dict[str, Any]) -> dict[str, Any]:
    error = data["error"]
    if isinstance(error, dict):
        return {**data, "error": {k: redact(backend, v) if isinstance(v, str) else v for k, v in error.items()}}
    return {**data, "error": redact(backend, error)}
