"""POST /v1/audio/speech: validate, resolve the model, synthesize on the first route that answers, relay."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway import json_body
from gateway.adapters.base import SPEECH, AudioStream, SpeechJob
from gateway.audio.formats import CONTENT_TYPES
from gateway.audio.meter import AudioMeter
from gateway.audio.transcode import encode
from gateway.audio.workers import AudioWorkers
from gateway.body import JSON_BODY_LIMIT, read_body
from gateway.handlers.routing import first_success
from gateway.lifecycle import AUDIO_WORKERS, METERING
from gateway.mapping import Candidate
from gateway.state import IDENTITY, OUTCOME, REQUEST_ID, TABLE
from gateway.streaming import first_chunk, relay, speech_sse
from gateway.validation import SpeechRequest, validate_speech


async def speech(request: web.Request) -> web.StreamResponse:
    req = validate_speech(await read_json(request))
    table = request[TABLE]
    model = table.model(req.model, request[IDENTITY], SPEECH)
    outcome = request[OUTCOME]
    outcome.input_chars = len(req.input)

    async def attempt(candidate: Candidate) -> tuple[bytes, AsyncIterator[bytes]]:
        job = speech_job(request, req, candidate)
        outcome.route(req.model, candidate.route.backend, candidate.route.model, job.voice.id)
        audio = await candidate.adapter.synthesize(job)
        chunks = to_client_format(audio, job, req, metered(request, req, audio.sse), request.app[AUDIO_WORKERS])
        return await first_chunk(chunks), chunks

    first, rest = await first_success(request, table.candidates(model, SPEECH), attempt)
    sse = req.stream_format == "sse"
    return await relay(request, first, rest, "text/event-stream" if sse else CONTENT_TYPES[req.response_format],
                       sse=sse)


async def read_json(request: web.Request) -> object:
    return json_body.parse(await read_body(request, JSON_BODY_LIMIT), request.charset)


def speech_job(request: web.Request, req: SpeechRequest, candidate: Candidate) -> SpeechJob:
    caps = candidate.adapter.capabilities
    native_speed = caps.native_speed and caps.native_speed[0] <= req.speed <= caps.native_speed[1]
    wants_sse = req.stream_format == "sse" and caps.speech_sse
    return SpeechJob(
        request_id=request[REQUEST_ID],
        public_model=req.model,
        model=candidate.route.model,
        voice=request[TABLE].voice(req.voice, candidate.route.backend),
        input=req.input,
        response_format=req.response_format if req.response_format in caps.speech_formats else "pcm",
        speed=req.speed if native_speed else 1.0,
        stream_format="sse" if wants_sse else "audio",
        instructions=req.instructions,
        extra=req.extra,
    )


def metered(request: web.Request, req: SpeechRequest, sse: bool) -> AudioMeter | None:
    """A fresh meter for this attempt's output, while metering is on."""
    if not request.app[METERING]:
        return None
    meter = request[OUTCOME].meter = AudioMeter(req.response_format, request.app[AUDIO_WORKERS], sse=sse)
    return meter


def to_client_format(audio: AudioStream, job: SpeechJob, req: SpeechRequest,
                     meter: AudioMeter | None, workers: AudioWorkers) -> AsyncIterator[bytes]:
    """The engine's audio as the client asked: transcoded and time-stretched only where needed,
    measured (before any SSE framing of ours) when metering is on."""
    if audio.sse:
        return meter.tap(audio.chunks) if meter else audio.chunks
    speed = req.speed / (job.speed if audio.speed_applied else 1.0)
    chunks = audio.chunks
    if not audio.format.is_openai(req.response_format) or speed != 1.0:
        chunks = encode(chunks, audio.format, req.response_format, speed, workers=workers)
    if meter is not None:
        chunks = meter.tap(chunks)
    if req.stream_format == "sse":
        return speech_sse(chunks, len(req.input))
    return chunks
