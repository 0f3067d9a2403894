"""Server events in OpenAI's shapes, and the ids they carry (`event_`, `item_`, `sess_` + 21 alphanumerics)."""

from __future__ import annotations

import secrets
import string
from typing import Any

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(21))


def event(type_: str, **fields: Any) -> dict[str, Any]:
    return {"type": type_, "event_id": new_id("event_"), **fields}


def error(code: str | None, message: str, *, param: str | None = None, event_id: str | None = None,
          type_: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's `error` event: non-fatal unless the server closes after it."""
    return event("error", error={"type": type_, "code": code, "message": message, "param": param,
                                 "event_id": event_id})


def user_item(item_id: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": "completed", "role": "user",
            "content": [{"type": "input_audio", "transcript": None}]}


class EventError(Exception):
    """A client event refused: becomes one `error` event, and the session goes on."""

    def __init__(self, code: str | None, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    def event(self, event_id: str | None) -> dict[str, Any]:
        return error(self.code, self.message, param=self.param, event_id=event_id)
