"""POST /v1/audio/transcriptions and /v1/audio/translations: one code path, the task differs.

Stages: spool the multipart body, validate its fields, resolve the model, measure the audio (from its
headers and packets, refusing it past `server.max_audio_seconds` before any backend sees it),
transcribe on the first route that answers, then answer in the client's format (relayed as is, or
rendered from structure).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from aiohttp import web

from gateway.adapters.base import TRANSCRIPTION, TRANSLATION, Passthrough, TranscriptionJob
from gateway.audio.duration import upload_seconds
from gateway.errors import UnsupportedError
from gateway.handlers.routing import first_success
from gateway.spool import Form, read_form
from gateway.state import AUDIO_WORKERS, IDENTITY, OUTCOME, REQUEST_ID, TABLE
from gateway.streaming import first_chunk, relay, send, transcript_sse
from gateway.table import Candidate
from gateway.transcript import Transcript
from gateway.transcript_formats import render, sse_transcript_text, transcript_text
from gateway.usage import Outcome
from gateway.validation import TRANSCRIPT_FORMATS, TranscriptionRequest, validate_transcription


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, "transcribe")


async def translations(request: web.Request) -> web.StreamResponse:
    return await _transcribe(request, "translate")


async def _transcribe(request: web.Request, task: str) -> web.StreamResponse:
    form = await read_form(request, request[TABLE].config.server, request.app[AUDIO_WORKERS])
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
    limit = table.config.server.max_audio_seconds
    upload = form.upload
    with upload.workers.job():  # a 503 when the audio workers are saturated
        request[OUTCOME].upload_measured(await upload.workers.finish(upload_seconds, upload.view(), limit))

    async def attempt(candidate: Candidate) -> Transcript | Passthrough:
        request[OUTCOME].route(req.model, candidate.route.backend, candidate.route.model)
        job = TranscriptionJob(
            request_id=request[REQUEST_ID], task=req.task, public_model=req.model, model=candidate.route.model,
            upload=form.upload, response_format=req.response_format, language=req.language, prompt=req.prompt,
            temperature=req.temperature, timestamp_granularities=req.timestamp_granularities,
            include=req.include, stream=req.stream, extra=req.extra, max_audio_seconds=limit)
        return await candidate.adapter.transcribe(job)

    return await first_success(request, candidates, attempt)


def _can_answer(candidate: Candidate, req: TranscriptionRequest) -> bool:
    """Rendered formats work for every engine; others only where the engine speaks them itself."""
    return (req.response_format in TRANSCRIPT_FORMATS
            or req.response_format in candidate.adapter.capabilities.transcript_formats)


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
