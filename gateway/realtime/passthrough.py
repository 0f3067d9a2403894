"""Pass-through: a realtime session relayed to an engine that speaks OpenAI's realtime transcription itself.

Chosen when the session's transcription model is known before any audio (from `?model=`, a client secret's
pinned session, or the first `session.update`) and one of that model's routes is an `openai` backend with
`realtime: true` (the first such route in the model's order). The gateway opens `<url>/realtime?intent=
transcription` on the backend with the backend's own credential (never the client's), replays the session's
settings to it as one `session.update` (its model the route's native one), and then relays every event, in order,
both ways: `session.update`'s model rewritten to the native one on the way up, the engine's `session.created`
dropped (the client has the gateway's) and its session ids and model shown as the gateway's on the way down.
If the engine cannot be reached, the session stays with the gateway (emulation, gateway/realtime/session.py).

Metering: the audio appended since the engine's last `committed` is that item's (seconds by the session's
format); at `committed` the item is admitted under the model's limits and budgets (a refused item gets the
gateway's `failed` event, and the engine's events for it are not relayed), and at `completed` it is billed on its
own (gateway/realtime/billing.py). When either side closes, the other is closed with the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from gateway.errors import GatewayError
from gateway.policy.admission import Admission
from gateway.policy.demand import Demand
from gateway.realtime.billing import NOT_BILLED, admit, bill_item
from gateway.realtime.events import event
from gateway.realtime.settings import Settings
from gateway.state import IDENTITY, OUTCOME, REQUEST_ID
from gateway.table import Candidate

log = logging.getLogger("gateway.realtime")
MAX_FRAME = 22 * 1024 * 1024


async def connect(candidate: Candidate, request: web.Request) -> aiohttp.ClientWebSocketResponse | None:
    """The engine's realtime socket, or None when it cannot be reached (the session then stays emulated)."""
    backend = candidate.adapter.backend
    headers = {"X-Request-ID": request[REQUEST_ID]}
    if backend.api_key:
        headers["Authorization"] = f"Bearer {backend.api_key}"
    try:
        return await candidate.adapter.http.ws_connect(  # type: ignore[attr-defined]
            f"{backend.url}/realtime", params={"intent": "transcription"}, headers=headers, heartbeat=20.0,
            max_msg_size=MAX_FRAME, timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
            autoclose=False)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log.warning("request %s: realtime backend '%s' unreachable (%s); the session stays with the gateway",
                    request[REQUEST_ID], backend.name, type(exc).__name__)
        return None


class Relay:
    def __init__(self, request: web.Request, client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                 candidate: Candidate, public_model: str, session_id: str, settings: Settings) -> None:
        self.request, self.client, self.upstream, self.candidate = request, client, upstream, candidate
        self.public, self.native, self.session_id, self.settings = (
            public_model, candidate.route.model, session_id, settings)
        self.pending_s = 0.0
        """Seconds appended since the engine's last commit."""
        self.items: dict[str, tuple[float, Admission | None]] = {}
        self.refused: set[str] = set()

    async def run(self, first_update: dict[str, Any]) -> None:
        self.request[OUTCOME].route(self.public, self.candidate.route.backend, self.native)
        await self.upstream.send_str(json.dumps(self._up(first_update)))
        down = asyncio.ensure_future(self._down())
        up = asyncio.ensure_future(self._up_loop())
        try:
            done, _ = await asyncio.wait([down, up], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in (down, up):
                task.cancel()
            await asyncio.gather(down, up, return_exceptions=True)
            code = self.upstream.close_code
            await self.upstream.close()
            if not self.client.closed:
                await self.client.close(code=code or 1000)
            for _, admission in self.items.values():
                if admission is not None:
                    await asyncio.shield(admission.finish(NOT_BILLED))

    async def _up_loop(self) -> None:
        async for msg in self.client:
            if msg.type != WSMsgType.TEXT:
                continue  # the gateway's own `invalid_event` would differ from the engine's: the engine answers
            try:
                message = json.loads(msg.data)
            except (ValueError, RecursionError):
                await self.upstream.send_str(msg.data)  # the engine's own `invalid_json`
                continue
            if isinstance(message, dict):
                if message.get("type") == "session.update":
                    message = self._up(message)
                elif message.get("type") in ("input_audio_buffer.append", "session.input_audio_buffer.append"):
                    audio = message.get("audio")
                    if isinstance(audio, str):
                        self.pending_s += len(audio) * 3 / 4 / (2 * self.settings.rate)
                elif message.get("type") == "input_audio_buffer.clear":
                    self.pending_s = 0.0
            await self.upstream.send_str(json.dumps(message))

    async def _down(self) -> None:
        async for msg in self.upstream:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                message = json.loads(msg.data)
            except (ValueError, RecursionError):
                continue  # not an event: nothing a client could read
            if not isinstance(message, dict):
                continue
            kind, item = message.get("type"), message.get("item_id")
            if kind == "session.created":
                continue  # the client has the gateway's
            if kind == "session.updated" and isinstance(message.get("session"), dict):
                message["session"] = self._shown(message["session"])
            elif kind == "input_audio_buffer.committed" and isinstance(item, str):
                await self._committed(item)
            elif isinstance(item, str) and item in self.refused:
                continue
            elif kind == "conversation.item.input_audio_transcription.completed" and isinstance(item, str):
                await self._completed(item, message.get("transcript"))
            with contextlib.suppress(ConnectionError):
                await self.client.send_str(json.dumps(message, ensure_ascii=False))

    async def _committed(self, item: str) -> None:
        seconds, self.pending_s = self.pending_s, 0.0
        try:
            admission = await admit(self.request, self.request[IDENTITY], Demand(self.public, speech=False,
                                                                                audio_seconds=seconds))
        except GatewayError as exc:
            self.refused.add(item)
            await self.client.send_str(json.dumps(event(
                "conversation.item.input_audio_transcription.failed", item_id=item, content_index=0,
                error={"type": exc.type, "code": exc.code, "message": exc.message, "param": None})))
            return
        self.items[item] = (seconds, admission)

    async def _completed(self, item: str, transcript: Any) -> None:
        seconds, admission = self.items.pop(item, (0.0, None))
        text = transcript if isinstance(transcript, str) else ""
        billed = bill_item(self.request, item, self.public, self.candidate.route.backend, self.native, seconds, text)
        if admission is not None:
            await asyncio.shield(admission.finish(billed))

    def _up(self, message: dict[str, Any]) -> dict[str, Any]:
        """A `session.update` with the route's native model."""
        transcription = _transcription(message.get("session"))
        if transcription is not None and "model" in transcription:
            transcription["model"] = self.native
        return message

    def _shown(self, session: dict[str, Any]) -> dict[str, Any]:
        """The engine's session as the gateway's: its id, the public model."""
        session["id"] = self.session_id
        transcription = _transcription(session)
        if transcription is not None and transcription.get("model") == self.native:
            transcription["model"] = self.public
        return session


def _transcription(session: Any) -> dict[str, Any] | None:
    """`session.audio.input.transcription`, where every level is an object."""
    for name in ("audio", "input", "transcription"):
        session = session.get(name) if isinstance(session, dict) else None
    return session if isinstance(session, dict) else None
