"""POST /v1/audio/transcriptions and /v1/audio/translations: one code path, the task differs.

Stages: spool the multipart body, validate its fields, resolve the model, then measure the audio and
transcribe at the same time, and answer in the client's format (relayed as is, or rendered from
structure).

The measurement (from headers and packets, on the audio workers: gateway/audio/duration.py) runs while
the first route is called, since its figure is needed only for billing, at the end. What keeps an
audio bomb from any backend is the payload (gateway/spool.py): it sends an upload's last bytes only
once the measurement passed. A refused upload (past `server.max_audio_seconds`, undecodable, out of
bounds) aborts the backend call, whose engine never got a complete request, and the client gets the
measurement's 400. Engines that get decoded audio (Wyoming, the embedded ones) wait for the
measurement before decoding, so a bomb never reaches them either.

With limits or budgets configured (gateway/policy/), the measurement comes first: the request is admitted
with its measured seconds before any backend is called. So it does where a route has a limit on what one
request may carry, or the client sent `chunking_strategy`: an upload past a limit is split at silences and its
chunks transcribed in parallel (gateway/chunking.py, gateway/handlers/long_audio.py).

A model's `deadline_s` bounds all its routes' attempts together, from the first (gateway/deadlines.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from aiohttp import web

from gateway import chunking
from gateway.adapters.base import TRANSCRIPTION, TRANSLATION, Passthrough, TranscriptionJob
from gateway.audio.duration import header_seconds, upload_seconds
from gateway.deadlines import within_deadline
from gateway.errors import UnsupportedError
from gateway.form import Form, read_form
from gateway.handlers.long_audio import transcribe_long
from gateway.handlers.routing import first_success
from gateway.policy.admission import admit
from gateway.policy.demand import Demand
from gateway.spool import Upload
from gateway.state import AUDIO_WORKERS, IDENTITY, OUTCOME, REQUEST_ID, SPOOL_MEMORY, TABLE
from gateway.streaming import first_chunk, relay, send, transcript_sse
from gateway.table import Candidate
from gateway.transcript import Transcript, normalize
from gateway.transcript_formats import render, sse_transcript_text, transcript_text
from gateway.usage import Outcome
from gateway.validation import TRANSCRIPT_FORMATS, TranscriptionRequest, validate_transcription


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, "transcribe")


async def translations(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, "translate")


async def _transcribe(request: web.Request, task: str) -> web.StreamResponse:
    form = await read_form(request, request[TABLE].config.server, request.app[AUDIO_WORKERS],
                           request.app[SPOOL_MEMORY])
    try:
        request[OUTCOME].upload_received(form.upload.size if form.upload else 0)
        req = validate_transcription(form.fields, task, form.upload is not None)
        result = await transcribe(request, req, form)
        return await respond(request, req, result)
    finally:
        form.close()


async def transcribe(request: web.Request, req: TranscriptionRequest, form: Form) -> Transcript | Passthrough:
    assert form.upload is not None
    table = request[TABLE]
    capability = TRANSLATION if req.task == "translate" else TRANSCRIPTION
    model = table.model(req.model, request[IDENTITY], capability)
    candidates = [c for c in table.candidates(model, capability) if _can_answer(c, req)]
    if not candidates:
        raise UnsupportedError(f"The model `{req.model}` cannot answer in response_format "
                               f"'{req.response_format}'.", param="response_format", code="unsupported_format")
    candidates = _word_timed(candidates, req)
    config = table.config
    limit = config.server.max_audio_seconds
    wanted = chunking.strategy(req.extra)

    def job_for(candidate: Candidate, upload: Upload) -> TranscriptionJob:
        request[OUTCOME].route(req.model, candidate.route.backend, candidate.route.model)
        return TranscriptionJob(
            request_id=request[REQUEST_ID], task=req.task, public_model=req.model, model=candidate.route.model,
            upload=upload, response_format=req.response_format, language=req.language, prompt=req.prompt,
            temperature=req.temperature, timestamp_granularities=req.timestamp_granularities,
            include=req.include, stream=req.stream, extra=req.extra, max_audio_seconds=limit)

    async def attempt(candidate: Candidate) -> Transcript | Passthrough:
        return await candidate.adapter.transcribe(job_for(candidate, form.upload))  # type: ignore[arg-type]

    measuring = _measure(form.upload, limit)  # a 503 now when the audio workers are saturated
    try:
        # the seconds first: a WAV has them in its header, the policy needs them, or they decide on splitting
        if measuring.done() or config.policy.active or chunking.limited(candidates, config.limits, wanted):
            seconds = await measuring
            request[OUTCOME].upload_measured(seconds)
            await admit(request, Demand(req.model, speech=False, audio_seconds=seconds))
            cut = chunking.plan(candidates, config.limits, form.upload.size, seconds, wanted, config.long_audio)
            if cut is not None:
                return await transcribe_long(request, req, form.upload, candidates, model, cut, job_for)
            return await within_deadline(model, first_success(request, candidates, attempt, model),
                                         request[REQUEST_ID])
        answering = asyncio.ensure_future(within_deadline(
            model, first_success(request, candidates, attempt, model), request[REQUEST_ID]))
        try:
            request[OUTCOME].upload_measured(await measuring)
        except BaseException:
            await _settle(answering)  # a refused upload: the backend call is aborted before its last bytes
            answer = None if answering.cancelled() or answering.exception() else answering.result()
            if isinstance(answer, Passthrough) and answer.chunks is not None:  # it streamed before the body ended
                await answer.chunks.aclose()  # type: ignore[attr-defined]
            raise
        return await answering
    finally:
        await _settle(measuring)  # before the spool closes: the measurement reads it


def _measure(upload: Upload, limit: float) -> asyncio.Future[float]:
    """Measure `upload`: a PCM WAV in memory at once, by its header (cheaper than a thread hand-off), else
    started on the audio workers as one admitted job (a 503 here when all are taken)."""
    if upload.in_memory and (seconds := header_seconds(upload.view(), limit)) is not None:
        upload.measurement = done = asyncio.get_running_loop().create_future()
        done.set_result(seconds)
        return done
    upload.workers.admit()

    async def measure() -> float:
        try:
            return await upload.workers.finish(upload_seconds, upload.view(), limit)
        finally:
            upload.workers.release()

    upload.measurement = task = asyncio.ensure_future(measure())
    return task


async def _settle(task: asyncio.Future[Any]) -> None:
    """Cancel `task` if it still runs and wait for it to end; its outcome is moot by now."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it


def _can_answer(candidate: Candidate, req: TranscriptionRequest) -> bool:
    """Rendered formats work for every engine; others only where the engine speaks them itself."""
    return (req.response_format in TRANSCRIPT_FORMATS
            or req.response_format in candidate.adapter.capabilities.transcript_formats)


def _word_timed(candidates: list[Candidate], req: TranscriptionRequest) -> list[Candidate]:
    """For word timestamps, only the routes whose engine times words itself: a text-only engine (Wyoming)
    would leave the gateway to make the times up, and a client cannot tell made-up times from real ones.
    A model with no such route refuses the request, as OpenAI refuses a value a model does not support."""
    if "word" not in req.timestamp_granularities:
        return candidates
    timed = [c for c in candidates if c.adapter.capabilities.word_timestamps]
    if not timed:
        backends = ", ".join(sorted({f"'{c.route.backend}'" for c in candidates}))
        raise UnsupportedError(
            f"The model `{req.model}` cannot give word timestamps: its backends ({backends}) return text "
            "without word timings. Ask for timestamp_granularities[]=segment, or use a model whose engine "
            "times words.", param="timestamp_granularities[]", code="unsupported_value")
    return timed


async def respond(request: web.Request, req: TranscriptionRequest,
                  result: Transcript | Passthrough) -> web.StreamResponse:
    outcome = request[OUTCOME]
    if isinstance(result, Passthrough) and result.chunks is not None:
        events = count_done_text(result.chunks, outcome)
        return await relay(request, await first_chunk(events), events, result.content_type, sse=True)
    if isinstance(result, Passthrough):
        body = result.body or b""
        if req.stream:  # the backend answered with a finished transcript: stream it as OpenAI's events
            return await _stream(request, Transcript(transcript_text(body, req.response_format)))
        outcome.text_returned(transcript_text(body, req.response_format))
        return await send(request, web.Response(body=body, content_type=result.content_type.split(";")[0],
                                                charset="utf-8" if "charset" in result.content_type else None))
    if result.duration is None:
        result = replace(result, duration=outcome.input_audio_seconds)
    elif result.decoded:  # the gateway's own decode: more audio than the packets said is billed
        outcome.upload_decoded(result.duration)
    result = normalize(result)  # what the engine said, as OpenAI says it (gateway/transcript.py)
    if req.stream:
        return await _stream(request, result)
    rendered = render(result, req.response_format, task=req.task, granularities=req.timestamp_granularities)
    outcome.text_returned(rendered.text)
    ctype, _, params = rendered.content_type.partition(";")
    return await send(request, web.Response(body=rendered.body, content_type=ctype,
                                            charset="utf-8" if "charset" in params else None))


async def _stream(request: web.Request, transcript: Transcript) -> web.StreamResponse:
    request[OUTCOME].text_returned(transcript.text)
    events = transcript_sse(transcript)
    return await relay(request, await first_chunk(events), events, "text/event-stream", sse=True)


async def count_done_text(events: AsyncIterator[bytes], outcome: Outcome) -> AsyncIterator[bytes]:
    """Relay an upstream's transcription events (one whole event per chunk), noting the final text's length
    for billing."""
    try:
        async for event in events:
            text = sse_transcript_text(event)
            if text is not None:
                outcome.text_returned(text)
            yield event
    finally:
        await events.aclose()  # type: ignore[attr-defined]
