"""One committed item of a realtime session, transcribed: admitted under the traffic policy, sent through its model's
routes, its events sent in commit order, billed (gateway/realtime/billing.py).

The item's audio is a WAV upload (the session's rate) sent through the model's routes like an HTTP transcription
(gateway/handlers/routing.py: failover, retries, ejection, admission slots; a chunk's slot is given back as soon as
its answer is whole). A file engine's text is one `delta`; an engine that streams its transcript
(`Capabilities.live_transcript`: Wyoming `transcript-chunk`, Deepgram live) has each piece sent as a `delta` as it
comes, once every item before this one has reported (until then its pieces are held). Until a delta reached the
client an engine's failure fails over and the next route starts afresh; after one, the item fails: a new route's
deltas would repeat what was said. Then `completed` with `usage: {type: duration, seconds}` (the committed audio
rounded up, as OpenAI reports duration usage), or `failed` (`transcription_error`, or a refusing limit's own type).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.adapters.base import TRANSCRIPTION, Passthrough, TranscriptionJob
from gateway.deadlines import within_deadline
from gateway.errors import GatewayError, RateLimitError, Reason, UpstreamError
from gateway.handlers.routing import first_success
from gateway.policy.admission import Admission
from gateway.policy.demand import Demand
from gateway.realtime.billing import NOT_BILLED, admit, bill_item
from gateway.realtime.events import event
from gateway.realtime.settings import Transcription
from gateway.spool import Upload
from gateway.state import AUDIO_WORKERS, IDENTITY, OUTCOME, REQUEST_ID, SPOOL_MEMORY, TABLE
from gateway.table import Candidate
from gateway.transcript import Transcript
from gateway.transcript_json import parse_transcript

Send = Callable[[dict[str, Any]], Awaitable[None]]


class Item:
    def __init__(self, request: web.Request, send: Send, item_id: str, wanted: Transcription,
                 before: asyncio.Future[None] | None, reported: asyncio.Future[None]) -> None:
        self.request, self.send, self.id, self.wanted = request, send, item_id, wanted
        self.before = before
        """Done once the item committed before this one has reported (None: it is the first)."""
        self.reported = reported
        """Set once this item has reported (or given up), for the next."""

    async def transcribe(self, data: bytes, seconds: float) -> None:
        """Transcribe the item's audio (`data`, a WAV of `seconds`) and report it, after the items before it."""
        request, app, item_id, wanted, before = self.request, self.request.app, self.id, self.wanted, self.before
        server = request[TABLE].config.server
        upload = Upload(f"{item_id}.wav", "audio/wav", app[AUDIO_WORKERS], app[SPOOL_MEMORY],
                        server.spool_memory_bytes, server.spool_dir)
        deltas = _Deltas(self.send, item_id, before)
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
                await self.send(event("conversation.item.input_audio_transcription.failed", item_id=item_id,
                                      content_index=0, error={"type": _failure_type(failure),
                                                              "code": failure.code or failure.reason,
                                                              "message": failure.message, "param": None}))
                return
            await deltas.finish(text)
            await self.send(event("conversation.item.input_audio_transcription.completed", item_id=item_id,
                                  content_index=0, transcript=deltas.text,
                                  usage={"type": "duration", "seconds": math.ceil(round(seconds, 6))}))
            c = route[-1]
            billed = bill_item(request, item_id, wanted.model, c.route.backend, c.route.model, seconds, deltas.text)
        finally:
            upload.close()
            if not self.reported.done():
                self.reported.set_result(None)
            if admission is not None:
                await asyncio.shield(admission.finish(billed))

    async def _heard(self, upload: Upload, wanted: Transcription, route: list[Candidate], deltas: _Deltas) -> str:
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


class _Deltas:
    """One item's `delta` events: sent as pieces come while the items before it have reported, else held."""

    def __init__(self, send: Send, item_id: str, before: asyncio.Future[None] | None) -> None:
        self.send, self.item_id, self.before = send, item_id, before
        self.text = ""
        """What was sent."""
        self.held: list[str] = []

    async def say(self, piece: str) -> None:
        if piece:
            self.held.append(piece)
        if self.before is None or self.before.done():
            for piece in self.held:
                self.text += piece
                await self.send(event("conversation.item.input_audio_transcription.delta",
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
