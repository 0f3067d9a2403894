"""One realtime transcription session: client events in, server events out, in OpenAI's order.

The session reads client events one at a time (so a client sending faster than the gateway keeps up is held back
by TCP, never buffered without bound). Appended audio goes to the input buffer (gateway/realtime/audio.py) and,
with server VAD, to the detector (gateway/realtime/vad.py), which opens a turn (`speech_started`, its item id
allocated then) and closes it (`speech_stopped`), committing the turn as an item. A client commit does the same
for the whole buffer when VAD is off. A committed item is announced (`input_audio_buffer.committed`,
`conversation.item.added`, `conversation.item.done`) and transcribed in the background, at most
`realtime.max_pending_items` at once per session (the next commit waits: TCP holds the client back again):
its audio as a WAV upload through the model's routes, like an HTTP transcription (failover, retries, ejection,
admission slots). Its text comes as one `...transcription.delta` per segment and one `...completed` with
`usage: {type: duration, seconds}` (the committed audio rounded up, as OpenAI reports duration usage), or as
`...failed`; items report in commit order. Each completed item is billed on its own (gateway/realtime/billing.py).

The session ends when the client closes, at `realtime.max_session_s` (close 1001, OpenAI's reason text) or when
the gateway drains (items already committed finish, then close 1001). Nothing outlives it: transcriptions in
flight are cancelled, their spools closed. Faults of the gateway's own close the socket with 1011.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from typing import Any

from aiohttp import WSMsgType, web

from gateway.adapters.base import TRANSCRIPTION, Passthrough, TranscriptionJob
from gateway.audio.splitter import wav
from gateway.deadlines import within_deadline
from gateway.errors import GatewayError, RateLimitError, Reason, UpstreamError
from gateway.handlers.routing import first_success
from gateway.policy.admission import Admission
from gateway.policy.demand import Demand
from gateway.realtime import passthrough
from gateway.realtime import settings as session_settings
from gateway.realtime.audio import Buffer, decode_append
from gateway.realtime.billing import NOT_BILLED, admit, bill_item
from gateway.realtime.events import EventError, error, event, new_id, user_item
from gateway.realtime.settings import Settings
from gateway.realtime.vad import ServerVad, Started, Stopped
from gateway.settings import Realtime
from gateway.spool import Upload
from gateway.state import AUDIO_WORKERS, DRAINING, IDENTITY, OUTCOME, REQUEST_ID, SPOOL_MEMORY, TABLE
from gateway.table import Candidate
from gateway.transcript import Transcript
from gateway.transcript_json import parse_transcript

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
        if self.turn is None:  # nobody speaks: keep only what a turn's prefix padding may need
            padding = (self.settings.turn_detection.prefix_padding_ms if self.settings.turn_detection else 0)
            self.buffer.drop_before(self.buffer.end - (padding + 200) * self.buffer.rate // 1000)

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
        task = asyncio.ensure_future(self._transcribe(item_id, wav(pcm, len(pcm) // 2, self.buffer.rate),
                                                      len(pcm) / 2 / self.buffer.rate, transcription, before,
                                                      self.reported))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _transcribe(self, item_id: str, data: bytes, seconds: float, wanted: session_settings.Transcription,
                          before: asyncio.Future[None] | None, reported: asyncio.Future[None]) -> None:
        request, app = self.request, self.request.app
        server = request[TABLE].config.server
        upload = Upload(f"{item_id}.wav", "audio/wav", app[AUDIO_WORKERS], app[SPOOL_MEMORY],
                        server.spool_memory_bytes, server.spool_dir)
        deltas = _Deltas(self, item_id, before)
        route: list[Candidate] = []
        admission: Admission | None = None
        billed = NOT_BILLED
        try:
            await upload.write(data)
            del data
            upload.measurement = measured = asyncio.get_running_loop().create_future()
            measured.set_result(seconds)
            try:
                admission = await admit(request, request[IDENTITY], Demand(wanted.model, speech=False,
                                                                           audio_seconds=seconds))
                text, failure = await self._heard(upload, wanted, route, deltas), None
            except GatewayError as exc:
                text, failure = "", exc
            if before is not None:
                await before  # items report in commit order
            if failure is not None:
                await self._send(event("conversation.item.input_audio_transcription.failed", item_id=item_id,
                                       content_index=0, error={"type": _failure_type(failure),
                                                               "code": failure.code or failure.reason,
                                                               "message": failure.message, "param": None}))
                return
            await deltas.finish(text)
            await self._send(event("conversation.item.input_audio_transcription.completed", item_id=item_id,
                                   content_index=0, transcript=deltas.text,
                                   usage={"type": "duration", "seconds": math.ceil(round(seconds, 6))}))
            c = route[-1]
            billed = bill_item(request, item_id, wanted.model, c.route.backend, c.route.model, seconds, deltas.text)
        finally:
            upload.close()
            self.pending.release()
            if not reported.done():
                reported.set_result(None)
            if admission is not None:
                await asyncio.shield(admission.finish(billed))

    async def _heard(self, upload: Upload, wanted: session_settings.Transcription, route: list[Candidate],
                     deltas: _Deltas) -> str:
        """The item's transcript, from the model's routes (the session's table snapshot). An engine that streams
        its transcript (`live_transcript`) has its pieces sent as deltas as they come; until one was sent, its
        failure fails over (the next route starts afresh), after it the item fails (what was said stands)."""
        request = self.request
        table = request[TABLE]
        model = table.model(wanted.model, request[IDENTITY], TRANSCRIPTION)
        server = table.config.server

        async def attempt(candidate: Candidate) -> str:
            route.append(candidate)
            request[OUTCOME].route(wanted.model, candidate.route.backend, candidate.route.model)
            job = TranscriptionJob(
                request_id=request[REQUEST_ID], task="transcribe", public_model=wanted.model,
                model=candidate.route.model, upload=upload, response_format="json", language=wanted.language,
                prompt=wanted.prompt, max_audio_seconds=server.max_audio_seconds)
            if not candidate.adapter.capabilities.live_transcript:
                return _text_of(await candidate.adapter.transcribe(job))
            deltas.forget()
            pieces = candidate.adapter.transcribe_live(job)  # type: ignore[attr-defined]
            try:
                async for piece in pieces:
                    await deltas.say(piece)
            except GatewayError as exc:
                if not deltas.text:
                    raise
                raise _Cut(f"Backend '{candidate.route.backend}' broke off its transcript: {exc.message}",
                           code=exc.code) from exc
            finally:
                await pieces.aclose()
            return deltas.text + "".join(deltas.held)

        return await within_deadline(model, first_success(request, table.candidates(model, TRANSCRIPTION), attempt,
                                                          model, hold=False), request[REQUEST_ID])

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


class _Deltas:
    """One item's `delta` events: sent as pieces come while the items before it have reported, else held."""

    def __init__(self, session: Session, item_id: str, before: asyncio.Future[None] | None) -> None:
        self.session, self.item_id, self.before = session, item_id, before
        self.text = ""
        """What was sent."""
        self.held: list[str] = []

    async def say(self, piece: str) -> None:
        if piece:
            self.held.append(piece)
        if self.before is None or self.before.done():
            for piece in self.held:
                self.text += piece
                await self.session._send(event("conversation.item.input_audio_transcription.delta",
                                               item_id=self.item_id, content_index=0, delta=piece))
            self.held.clear()

    async def finish(self, text: str) -> None:
        """Send what is held, and what of `text` was never streamed (all of it from a file engine)."""
        await self.say(text[len(self.text) + sum(map(len, self.held)):])

    def forget(self) -> None:
        """A fresh attempt: pieces held from a failed one are dropped (none was sent: see `_heard`)."""
        self.held.clear()


class _Cut(GatewayError):
    """A streamed transcript broken after part of it reached the client: the item fails, without failover (a new
    route's deltas would repeat what was said). Its reason is no backend outcome: ejection counts it as undecided."""

    status = 502
    type = "upstream_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message, code=code, reason="cut_mid_transcript")


def _failure_type(failure: GatewayError) -> str:
    """A refusal by the gateway's limits keeps its own type (`requests`, `insufficient_quota`); an engine's failure
    is OpenAI's `transcription_error`."""
    return failure.type if isinstance(failure, RateLimitError) else "transcription_error"


def _text_of(answer: Transcript | Passthrough) -> str:
    if isinstance(answer, Transcript):
        return " ".join(answer.text.split())
    try:
        return " ".join(parse_transcript(answer.body or b"").text.split())
    except ValueError:
        raise UpstreamError("The backend answered with a malformed transcript.", reason=Reason.BAD_RESPONSE) from None
