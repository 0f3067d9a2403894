"""Ephemeral client secrets (OpenAI's `POST /v1/realtime/client_secrets`): a browser gets a short-lived `ek_`
token from its own backend, which holds the gateway key, and opens realtime sessions with it, so the gateway
key never reaches the browser.

A token is bound to the key that minted it, and to the session config pinned with it; if that config names a
transcription model, that is the only model the token may use. The state store holds it (`state:`, so every
worker and replica sees it) under the SHA-256 of the token: the token itself is never stored or logged.
`resolve` rebuilds the identity from the current config's key of that name, so removing a key (a reload)
invalidates its tokens at once. Expiry limits creating sessions only: OpenAI's "the session itself may
continue after that time".
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import json_body
from gateway.adapters.base import TRANSCRIPTION
from gateway.auth import Identity
from gateway.body import read_body
from gateway.config import Config
from gateway.errors import GatewayError, InvalidRequestError, ServiceUnavailableError
from gateway.state import IDENTITY, SHARED_STATE, TABLE

PREFIX = "ek_"
TTL_RANGE = (10, 7200)
"""`expires_after.seconds`, OpenAI's bounds."""
DEFAULT_TTL_S = 600
MAX_SESSION = 16 * 1024
"""The pinned session, as JSON, at most (it is stored with every token)."""
MAX_BODY = MAX_SESSION + 1024
FEATURE = {"client secrets": "closed"}
"""A token minted in one process's memory would be unknown to the others: a failed store refuses minting."""
MODEL = "session.audio.input.transcription.model"
FIELDS = ("expires_after", "session")
READ_ONLY = ("object", "id", "expires_at")
"""Session fields the gateway sets in its answer; a client may not pin them."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid token lets its holder do: open sessions as `identity` with `session` pinned."""

    identity: Identity
    """The minting key as the current config has it, its models narrowed to the pinned one."""
    session: dict[str, Any] | None
    expires_at: float


async def client_secrets(request: web.Request) -> web.Response:
    identity = request[IDENTITY]
    ttl_s, session = validate(json_body.parse(await read_body(request, MAX_BODY), request.charset))
    model = pinned_model(session)
    if model is not None:
        try:
            request[TABLE].model(model, identity, TRANSCRIPTION)
        except GatewayError as exc:
            exc.param = MODEL
            raise
    token = PREFIX + secrets.token_urlsafe(24)  # 32 characters, 192 bits
    now = time.time()
    expires_at = math.floor(now) + ttl_s
    record = {"key_name": identity.key_name, "tenant": identity.tenant, "models": [model] if model else None,
              "session": session, "expires_at": expires_at}
    value = json.dumps(record, ensure_ascii=False)
    await request.app[SHARED_STATE].call(FEATURE, "secret_put", lambda store: store.put(key(token), value,
                                                                                      expires_at - now))
    shown = {"type": "transcription", "object": "realtime.transcription_session",
             "id": "sess_" + secrets.token_urlsafe(16), "expires_at": expires_at,
             **{k: v for k, v in (session or {}).items() if k != "type"}}
    return web.json_response({"value": token, "expires_at": expires_at, "session": shown},
                             headers={"Cache-Control": "no-store"})


async def resolve(app: web.Application, config: Config, token: str) -> Grant | None:
    """The grant of a token, or None: not an `ek_` token, unknown, expired, its key no longer in `config`,
    or the store unreachable (the store logs and counts that)."""
    if not token.startswith(PREFIX) or len(token) > 256:
        return None
    try:
        held, _ = await app[SHARED_STATE].call(FEATURE, "secret_get", lambda store: store.get(key(token)))
    except ServiceUnavailableError:
        return None
    if held is None:
        return None
    record = json.loads(held)
    match = next((k for k in config.keys if k.name == record["key_name"]), None)
    if match is None:
        return None
    models, pinned = match.models, record["models"]
    if pinned is not None:  # the pinned model only, if the key may still use it
        models = frozenset(pinned) if models is None else models & frozenset(pinned)
    return Grant(Identity(match.name, match.tenant, models, match.rules), record["session"], record["expires_at"])


def key(token: str) -> str:
    """Where a token's record is stored: its SHA-256, so a reader of the store cannot use what it reads."""
    return "ek:" + hashlib.sha256(token.encode()).hexdigest()


def validate(body: object) -> tuple[int, dict[str, Any] | None]:
    """OpenAI's body: `expires_after` {anchor: created_at, seconds: 10..7200} and an optional transcription
    `session`; the TTL in seconds and the session to pin."""
    if not isinstance(body, dict):
        raise InvalidRequestError("Invalid body: expected a JSON object.", code="invalid_type")
    for name in body:
        if name not in FIELDS:
            raise _unknown(name)
    ttl_s = DEFAULT_TTL_S
    expires = body.get("expires_after")
    if expires is not None:
        if not isinstance(expires, dict):
            raise _wrong_type("expires_after", "an object", expires)
        for name in expires:
            if name not in ("anchor", "seconds"):
                raise _unknown(f"expires_after.{name}")
        anchor = expires.get("anchor", "created_at")
        if anchor != "created_at":
            raise _invalid("expires_after.anchor", anchor, "'created_at'")
        ttl_s = _seconds(expires.get("seconds", DEFAULT_TTL_S))
    session = body.get("session")
    if session is None:
        return ttl_s, None
    if not isinstance(session, dict):
        raise _wrong_type("session", "an object", session)
    if "type" not in session:
        raise InvalidRequestError("Missing required parameter: 'session.type'.", param="session.type",
                                  code="missing_required_parameter")
    if session["type"] != "transcription":
        raise _invalid("session.type", session["type"], "'transcription' (the gateway serves transcription "
                       "sessions only)")
    for name in READ_ONLY:
        if name in session:
            raise _unknown(f"session.{name}")
    if len(json.dumps(session, ensure_ascii=False).encode()) > MAX_SESSION:
        raise InvalidRequestError(f"Invalid 'session': it is larger than {MAX_SESSION} bytes as JSON.",
                                  param="session", code="invalid_value")
    pinned_model(session)
    return ttl_s, session


def pinned_model(session: dict[str, Any] | None) -> str | None:
    """`session.audio.input.transcription.model`, each level checked for its type."""
    level: Any = session
    path = "session"
    for name in ("audio", "input", "transcription"):
        level = level.get(name) if isinstance(level, dict) else None
        path += f".{name}"
        if level is None:
            return None
        if not isinstance(level, dict):
            raise _wrong_type(path, "an object", level)
    model = level.get("model")
    if model is None:
        return None
    if not isinstance(model, str) or not model:
        raise _wrong_type(MODEL, "a non-empty string", model)
    return model


def _seconds(value: Any) -> int:
    param = "expires_after.seconds"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(param, "an integer", value)
    low, high = TTL_RANGE
    if value < low:
        raise InvalidRequestError(f"Invalid '{param}': integer below minimum value. Expected a value >= {low}, "
                                  f"but got {value} instead.", param=param, code="integer_below_min_value")
    if value > high:
        shown = value if value < 10**20 else "a larger number"
        raise InvalidRequestError(f"Invalid '{param}': integer above maximum value. Expected a value <= {high}, "
                                  f"but got {shown} instead.", param=param, code="integer_above_max_value")
    return value


def _wrong_type(name: str, expected: str, value: Any) -> InvalidRequestError:
    got = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
           dict: "an object", type(None): "null"}.get(type(value), "something else")
    return InvalidRequestError(f"Invalid type for '{name}': expected {expected}, but got {got} instead.",
                               param=name, code="invalid_type")


def _invalid(name: str, value: Any, supported: str) -> InvalidRequestError:
    shown = value if isinstance(value, str) and len(value) <= 64 else json.dumps(value)[:64]
    return InvalidRequestError(f"Invalid value: '{shown}'. Supported values are: {supported}.", param=name,
                               code="invalid_value")


def _unknown(name: str) -> InvalidRequestError:
    name = name if len(name) <= 128 else name[:128] + "..."  # a client's own text, echoed: bounded
    return InvalidRequestError(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
