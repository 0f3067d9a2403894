"""POST /v1/audio/speech: validate, resolve the model, synthesize on the first route that answers, relay."""

from __future__ import annotations

from aiohttp import web

from gateway import json_body
from gateway.adapters.base import SPEECH, AudioStream, SpeechJob
from gateway.audio.formats import CONTENT_TYPES
from gateway.audio.meter import AudioMeter
from gateway.audio.transcode import encode
from gateway.audio.workers import AudioWorkers
from gateway.body import JSON_BODY_LIMIT, read_body
from gateway.deadlines import first_byte
from gateway.handlers.routing import first_success
from gateway.policy.admission import admit
from gateway.policy.demand import Demand
from gateway.state import AUDIO_WORKERS, IDENTITY, METERING, OUTCOME, REQUEST_ID, TABLE
from gateway.streaming import Stages, first_chunk, relay, speech_sse
from gateway.table import Candidate
from gateway.validation import SpeechRequest, validate_speech


async def speech(request: web.Request) -> web.StreamResponse:
    req = validate_speech(await read_json(request))
    table = request[TABLE]
    model = table.model(req.model, request[IDENTITY], SPEECH)
    await admit(request, Demand(req.model, speech=True, characters=len(req.input), speed=req.speed))
    outcome = request[OUTCOME]
    workers = request.app[AUDIO_WORKERS]
    meter = AudioMeter(req.response_format, workers) if request.app[METERING] else None
    outcome.speech_input(req.input, meter)

    async def attempt(candidate: Candidate) -> tuple[bytes, Stages]:
        return await first_byte(candidate.adapter.backend, start(candidate))

    async def start(candidate: Candidate) -> tuple[bytes, Stages]:
        """One route's call and its first chunk (bounded by the backend's first_byte_timeout_s)."""
        job = speech_job(request, req, candidate)
        outcome.route(req.model, candidate.route.backend, candidate.route.model, job.voice.id)
        audio = await candidate.adapter.synthesize(job)
        stages = Stages(audio.chunks)  # from here on, every path closes the engine stream
        try:
            if meter is not None:
                meter.reset(sse=audio.sse)  # this attempt's output only
            to_client_format(stages, audio, job, req, meter, workers)
        except BaseException:
            await stages.aclose()
            raise
        return await first_chunk(stages), stages

    first, rest = await first_success(request, table.candidates(model, SPEECH), attempt, model)
    sse = req.stream_format == "sse"
    return await relay(request, first, rest, "text/event-stream" if sse else CONTENT_TYPES[req.response_format],
                       sse=sse)


async def read_json(request: web.Request) -> object:
    return json_body.parse(await read_body(request, JSON_BODY_LIMIT), request.charset)


def speech_job(request: web.Request, req: SpeechRequest, candidate: Candidate) -> SpeechJob:
    caps = candidate.adapter.capabilities
    native_speed = caps.native_speed and caps.native_speed[0] <= req.speed <= caps.native_speed[1]
    response_format = caps.speech_format(req.response_format)
    # the engine's own SSE only when its audio needs nothing more: else the core transcodes and frames it
    wants_sse = (req.stream_format == "sse" and caps.speech_sse and response_format == req.response_format
                 and (native_speed or req.speed == 1.0))
    return SpeechJob(
        request_id=request[REQUEST_ID],
        public_model=req.model,
        model=candidate.route.model,
        voice=request[TABLE].voice(req.voice, candidate.route.backend),
        input=req.input,
        response_format=response_format,
        speed=req.speed if native_speed else 1.0,
        stream_format="sse" if wants_sse else "audio",
        instructions=req.instructions,
        extra=req.extra,
    )


def to_client_format(stages: Stages, audio: AudioStream, job: SpeechJob, req: SpeechRequest,
                     meter: AudioMeter | None, workers: AudioWorkers) -> None:
    """Stack on the engine's audio what the client asked for: transcoded and time-stretched only where
    needed (on the audio workers), measured (before any SSE framing of ours) when metering is on."""
    speed = req.speed / (job.speed if audio.speed_applied else 1.0)
    if not audio.sse and (not audio.format.is_openai(req.response_format) or speed != 1.0):
        stages.add(lambda chunks: encode(chunks, audio.format, req.response_format, speed, workers=workers))
    if meter is not None:
        stages.add(meter.tap)
    if req.stream_format == "sse" and not audio.sse:
        stages.add(lambda chunks: speech_sse(chunks, len(req.input)))
