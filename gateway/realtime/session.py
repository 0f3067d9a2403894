"""One realtime transcription session: client events in, server events out, in OpenAI's order.

The session reads client events one at a time (so a client sending faster than the gateway keeps up is held back
by TCP, never buffered without bound). Appended audio goes to the input buffer (gateway/realtime/audio.py) and,
with server VAD, to the detector (gateway/realtime/vad.py), which opens a turn (`speech_started`, its item id
allocated then) and closes it (`speech_stopped`), committing the turn as an item. A client commit does the same
for the whole buffer when VAD is off. A committed item is announced (`input_audio_buffer.committed`,
`conversation.item.added`, `conversation.item.done`) and transcribed in the background (gateway/realtime/
items.py), at most `realtime.max_pending_items` at once per session (the next commit waits: TCP holds the client
back again); items report in commit order. A session whose model is routed to an engine that speaks OpenAI's
realtime itself is handed over to it before any audio (gateway/realtime/passthrough.py).

The session ends when the client closes, at `realtime.max_session_s` (close 1001, OpenAI's reason text) or when
the gateway drains (items already committed finish, then close 1001). Nothing outlives it: transcriptions in
flight are cancelled, their spools closed. Faults of the gateway's own close the socket with 1011.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from gateway.adapters.base import TRANSCRIPTION
from gateway.audio.splitter import wav
from gateway.errors import GatewayError
from gateway.realtime import passthrough
from gateway.realtime import settings as session_settings
from gateway.realtime.audio import Buffer, decode_append
from gateway.realtime.events import EventError, error, event, new_id, user_item
from gateway.realtime.items import Item
from gateway.realtime.settings import Settings
from gateway.realtime.vad import ServerVad, Started, Stopped
from gateway.settings import Realtime
from gateway.state import DRAINING, IDENTITY, TABLE

log = logging.getLogger("gateway.realtime")

CLIENT_EVENTS = ("session.update", "session.close", "input_audio_buffer.append", "session.input_audio_buffer.append",
                 "input_audio_buffer.commit", "input_audio_buffer.clear", "conversation.item.create",
                 "conversation.item.truncate", "conversation.item.delete", "conversation.item.retrieve",
                 "response.create", "response.cancel")
"""What OpenAI's GA endpoint accepts (its `invalid_value` error on `type` lists them)."""
CONVERSATION_ONLY = CLIENT_EVENTS[6:]
MIN_COMMIT_MS = 100
GOING_AWAY = 1001


class Session:
    def __init__(self, request: web.Request, ws: web.WebSocketResponse, limits: Realtime,
                 initial: Settings | None = None) -> None:
        self.request, self.ws, self.limits = request, ws, limits
        self.id = new_id("sess_")
        self.expires_at = int(time.time() + limits.max_session_s)
        self.settings = initial = initial or Settings()
        self.buffer = Buffer(initial.rate, limits.max_buffer_s)
        self.vad = self._vad()
        self.turn: tuple[str, int] | None = None
        """The open VAD turn: its item id and first sample."""
        self.previous_item: str | None = None
        self.pending = asyncio.Semaphore(limits.max_pending_items)
        self.tasks: set[asyncio.Task[None]] = set()
        self.relay: passthrough.Relay | None = None
        """Set when an engine took the session over (gateway/realtime/passthrough.py)."""
        self.reported: asyncio.Future[None] | None = None
        """Done once the last committed item has sent its events (items report in commit order)."""

    async def run(self) -> None:
        await self._send(event("session.created", session=self._shown()))
        guard = asyncio.ensure_future(self._guard())
        try:
            if self.settings.transcription is None or not await self._handover(self.settings):
                async for msg in self.ws:
                    if msg.type == WSMsgType.TEXT:
                        await self._text(msg.data)
                    elif msg.type == WSMsgType.BINARY:
                        await self._send(error("invalid_event", "Expected a text WebSocket message; binary "
                                               "frames are not supported."))
                    if self.relay is not None:
                        break
            if self.relay is not None:
                await self.relay.run(self._as_update())
        finally:
            guard.cancel()
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(guard, *self.tasks, return_exceptions=True)

    async def _guard(self) -> None:
        """Close at the session's cap, or once the gateway drains (after the items committed so far report)."""
        draining = asyncio.ensure_future(self.request.app[DRAINING].wait())
        try:
            done, _ = await asyncio.wait([draining], timeout=self.limits.max_session_s)
            if done:
                await asyncio.gather(*self.tasks, return_exceptions=True)
                await self.ws.close(code=GOING_AWAY, message=b"The server is shutting down.")
            else:
                minutes = f"{self.limits.max_session_s / 60:g}"
                await self.ws.close(code=GOING_AWAY,
                                    message=f"Your session hit the maximum duration of {minutes} minutes.".encode())
        finally:
            draining.cancel()

    async def _text(self, data: str) -> None:
        try:
            message = json.loads(data)
        except (ValueError, RecursionError):
            await self._send(error("invalid_json", "The server could not parse the event: not valid JSON."))
            return
        event_id = message.get("event_id") if isinstance(message, dict) else None
        event_id = event_id if isinstance(event_id, str) and len(event_id) <= 512 else None
        kind = message.get("type") if isinstance(message, dict) else None
        try:
            if kind not in CLIENT_EVENTS:
                raise EventError("invalid_value", "Invalid value for 'type'. Supported values are: "
                                 + ", ".join(f"'{k}'" for k in CLIENT_EVENTS) + ".", "type")
            if kind in CONVERSATION_ONLY:
                raise EventError("invalid_value", f"'{kind}' is not supported in a transcription session.", "type")
            if kind == "session.update":
                await self._update(message.get("session"))
            elif kind == "session.close":
                await self.ws.close()
            elif kind.endswith("input_audio_buffer.append"):
                await self._append(decode_append(message.get("audio"), self.settings.format))
            elif kind == "input_audio_buffer.commit":
                await self._commit(None)
            else:  # clear
                self.buffer.clear()
                self.turn, self.vad = None, self._vad()
                await self._send(event("input_audio_buffer.cleared"))
        except EventError as exc:
            await self._send(exc.event(event_id))

    async def _update(self, session: Any) -> None:
        updated = session_settings.apply(self.settings, session)
        if updated.transcription is not None:  # a model this key may use, for transcription (else an error)
            try:
                self.request[TABLE].model(updated.transcription.model, self.request[IDENTITY], TRANSCRIPTION)
            except GatewayError as exc:
                raise EventError(exc.code, exc.message, "session.audio.input.transcription.model") from None
        fresh = self.buffer.end == 0 and self.previous_item is None  # no audio yet: an engine may take it all
        if fresh and updated.transcription is not None and await self._handover(updated):
            self.settings = updated
            return  # the engine answers this update (passthrough.py)
        was, self.settings = self.settings, updated
        if updated.format != was.format:  # uncommitted audio in the old format is dropped; the timeline goes on
            start = self.buffer.end * updated.rate // self.buffer.rate
            self.buffer = Buffer(updated.rate, self.limits.max_buffer_s)
            self.buffer.start = start
        if (updated.format, updated.turn_detection) != (was.format, was.turn_detection):
            self.turn, self.vad = None, self._vad()
        await self._send(event("session.updated", session=self._shown()))

    async def _append(self, pcm: bytes) -> None:
        self._forget_silence()  # before the bound is checked: only what a turn may still need counts
        added = self.buffer.add(pcm)
        if self.vad is None:
            return
        for boundary in self.vad.feed(added):
            if isinstance(boundary, Started):
                item_id = new_id("item_")
                self.turn = (item_id, max(boundary.sample, self.buffer.start))
                await self._send(event("input_audio_buffer.speech_started", audio_start_ms=self.buffer.ms(
                    self.turn[1]), item_id=item_id))
            elif isinstance(boundary, Stopped) and self.turn is not None:
                item_id, start = self.turn
                self.turn = None
                await self._send(event("input_audio_buffer.speech_stopped", audio_end_ms=self.buffer.ms(
                    boundary.sample), item_id=item_id))
                await self._commit(None, item_id, start, boundary.sample)
        self._forget_silence()

    def _forget_silence(self) -> None:
        """Server VAD, nobody speaking: keep only what a turn's prefix padding may reach back to (and a margin
        for the detector's frames), so silence streamed for hours costs nothing."""
        turn = self.settings.turn_detection
        if self.vad is not None and self.turn is None and turn is not None:
            self.buffer.drop_before(self.buffer.end - (turn.prefix_padding_ms + 200) * self.buffer.rate // 1000)

    async def _commit(self, event_id: str | None, item_id: str | None = None, since: int | None = None,
                      upto: int | None = None) -> None:
        if item_id is None:  # the client's commit
            have = self.buffer.ms(self.buffer.end - self.buffer.start)
            if have < MIN_COMMIT_MS:
                raise EventError("input_audio_buffer_commit_empty", "Error committing input audio buffer: buffer "
                                 f"too small. Expected at least {MIN_COMMIT_MS}ms of audio, but buffer only has "
                                 f"{have:.2f}ms of audio.")
            item_id, self.turn = (self.turn[0] if self.turn else new_id("item_")), None
            self.vad = self._vad()
        _, pcm = self.buffer.take(upto, since)
        previous, self.previous_item = self.previous_item, item_id
        await self._send(event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id))
        await self._send(event("conversation.item.added", previous_item_id=previous, item=user_item(item_id)))
        await self._send(event("conversation.item.done", previous_item_id=previous, item=user_item(item_id)))
        transcription = self.settings.transcription
        if transcription is None:  # transcription off (OpenAI's default): committed, never transcribed
            return
        await self.pending.acquire()
        before, self.reported = self.reported, asyncio.get_running_loop().create_future()
        item = Item(self.request, self._send, item_id, transcription, before, self.reported)
        task = asyncio.ensure_future(self._transcribe(item, pcm))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _transcribe(self, item: Item, pcm: bytes) -> None:
        try:
            await item.transcribe(wav(pcm, len(pcm) // 2, self.buffer.rate), len(pcm) / 2 / self.buffer.rate)
        finally:
            self.pending.release()

    async def _handover(self, settings: Settings) -> bool:
        """Relay the session to a route that speaks OpenAI's realtime itself, if the model has one and it answers."""
        assert settings.transcription is not None
        table = self.request[TABLE]
        try:
            model = table.model(settings.transcription.model, self.request[IDENTITY], TRANSCRIPTION)
        except GatewayError:  # (a pinned model the key lost since): its items will fail, each saying why
            return False
        candidate = next((c for c in table.candidates(model, TRANSCRIPTION) if c.adapter.capabilities.realtime),
                         None)
        if candidate is None or (upstream := await passthrough.connect(candidate, self.request)) is None:
            return False
        self.relay = passthrough.Relay(self.request, self.ws, upstream, candidate, model.name, self.id, settings)
        return True

    def _as_update(self) -> dict[str, Any]:
        """The session's settings as one `session.update`, for an engine taking the session over."""
        shown = self._shown()
        return {"type": "session.update", "session": {k: v for k, v in shown.items()
                                                      if k not in ("object", "id", "expires_at")}}

    async def _send(self, payload: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        with contextlib.suppress(ConnectionError):  # the client is gone: the read loop ends the session
            await self.ws.send_str(json.dumps(payload, ensure_ascii=False))

    def _vad(self) -> ServerVad | None:
        turn = self.settings.turn_detection
        return None if turn is None else ServerVad(turn, self.settings.rate, self.buffer.end)

    def _shown(self) -> dict[str, Any]:
        return self.settings.shown(self.id, self.expires_at)
