"""`GET /v1/realtime?intent=transcription`: the WebSocket upgrade, and the checks OpenAI makes after it.

OpenAI answers every refusal after the upgrade, not with an HTTP status: the socket opens (101), one `error`
event says why, and the server closes it, with 3000 for a key (reason `invalid_request_error.invalid_api_key`)
and 4000 for the request's shape (reason `<type>.<code>`). So does the gateway: the auth middleware leaves this
path alone, and the key is checked here, from `Authorization: Bearer` (a gateway key, or an `ek_` client secret
minted by `POST /v1/realtime/client_secrets`, gateway/realtime/secrets.py) or from the browser's
`Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.<key>` (`realtime` is the protocol selected; the key
entry is never echoed). Beta clients (`OpenAI-Beta: realtime=v1`, or its subprotocol) get OpenAI's
`beta_api_shape_disabled`. Only transcription sessions are served: `?intent=transcription`, optionally with
`model=` naming the default transcription model (the form speaches takes). A plain GET without the upgrade is a
400. Past `realtime.max_sessions` open sessions in this process, close 1013 (try again later).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from aiohttp import web

from gateway.adapters.base import TRANSCRIPTION
from gateway.auth import Identity, authenticate, presented_key
from gateway.errors import AuthenticationError, GatewayError, InvalidRequestError
from gateway.policy.demand import Demand
from gateway.realtime import secrets
from gateway.realtime import settings as session_settings
from gateway.realtime.billing import NOT_BILLED, admit
from gateway.realtime.events import EventError, error
from gateway.realtime.session import Session
from gateway.realtime.settings import Settings, Transcription
from gateway.state import IDENTITY, OUTCOME, REALTIME_SESSIONS, TABLE

log = logging.getLogger("gateway.realtime")

KEY_PROTOCOL = "openai-insecure-api-key."
BETA_PROTOCOL = "openai-beta.realtime-v1"
MAX_EVENT_BYTES = 22 * 1024 * 1024
"""The largest client event read: a 15 MiB append, base64 (20 MiB), and its JSON around it."""
AUTH_CLOSE, REQUEST_CLOSE, TRY_LATER, INTERNAL = 3000, 4000, 1013, 1011


async def realtime(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(protocols=("realtime",), heartbeat=20.0, max_msg_size=MAX_EVENT_BYTES)
    if not ws.can_prepare(request).ok:
        raise InvalidRequestError("This endpoint is a WebSocket: connect with an Upgrade: websocket request.")
    await ws.prepare(request)
    config = request[TABLE].config
    try:
        identity, pinned = await _identity(request)
    except GatewayError as exc:
        return await _refuse(ws, exc.code, exc.message, AUTH_CLOSE)
    request[IDENTITY] = identity
    if request.headers.get("OpenAI-Beta", "").startswith("realtime") or BETA_PROTOCOL in _protocols(request):
        return await _refuse(ws, "beta_api_shape_disabled", "The Realtime Beta API is no longer supported. Please "
                             "use /v1/realtime for the GA API.", REQUEST_CLOSE)
    query = request.query
    if query.get("intent") != "transcription":
        code = "missing_model" if "intent" not in query and "model" not in query else "unsupported_intent"
        return await _refuse(ws, code, "Only transcription sessions are served here: connect with "
                             "?intent=transcription.", REQUEST_CLOSE)
    initial = Settings()
    if pinned is not None:  # a client secret's session: the start, which the client may then update
        try:
            initial = session_settings.apply(initial, pinned)
        except EventError as exc:
            return await _refuse(ws, exc.code, f"The client secret's session is not valid: {exc.message}",
                                 REQUEST_CLOSE)
    if model := query.get("model", "").strip():
        try:
            request[TABLE].model(model, identity, TRANSCRIPTION)
        except GatewayError as exc:
            return await _refuse(ws, exc.code or "invalid_model", exc.message, REQUEST_CLOSE)
        initial = replace(initial, transcription=Transcription(model))
    sessions = request.app[REALTIME_SESSIONS]
    if len(sessions) >= config.realtime.max_sessions:
        return await _refuse(ws, "server_busy", "Too many realtime sessions are open on this server; retry "
                             "shortly.", TRY_LATER, type_="server_error")
    try:
        admission = await admit(request, identity, Demand("", speech=False, session=True))
    except GatewayError as exc:  # a `sessions` limit (or the store, when limits are closed on its failure)
        return await _refuse(ws, exc.code, exc.message, TRY_LATER, type_=exc.type)
    session = Session(request, ws, config.realtime, initial)
    sessions.add(session.id)
    try:
        await session.run()
    except Exception:
        log.exception("realtime session %s failed", session.id)
        await ws.close(code=INTERNAL, message=b"server_error")
    finally:
        sessions.discard(session.id)
        if admission is not None:
            await asyncio.shield(admission.finish(NOT_BILLED))
    request[OUTCOME].sent(ws)
    return ws


async def _identity(request: web.Request) -> tuple[Identity, dict[str, Any] | None]:
    """Who connects, and the session a client secret pinned (None for a gateway key)."""
    config = request[TABLE].config
    key = presented_key(request)
    if key is None:
        offered = [p[len(KEY_PROTOCOL):] for p in _protocols(request) if p.startswith(KEY_PROTOCOL)]
        key = offered[0] if offered else None
    if key is not None and key.startswith(secrets.PREFIX):
        grant = await secrets.resolve(request.app, config, key)
        if grant is None:
            raise AuthenticationError("Incorrect or expired client secret provided.", code="invalid_api_key")
        return grant.identity, grant.session
    return authenticate(config, key), None


def _protocols(request: web.Request) -> list[str]:
    return [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]


async def _refuse(ws: web.WebSocketResponse, code: str | None, message: str, close: int,
                  type_: str = "invalid_request_error") -> web.WebSocketResponse:
    """OpenAI's refusal after the upgrade: one `error` event, then the close, its reason `<type>.<code>`."""
    payload: dict[str, Any] = error(code, message, type_=type_)
    await ws.send_json(payload)
    await ws.close(code=close, message=(f"{type_}.{code}" if code else type_).encode()[:120])
    return ws
