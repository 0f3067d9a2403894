"""What a request consumed and what it is billed, in one place: the request's `Outcome` (filled by the
handlers and the relay as the request runs), its `Bill` (computed once, when it is over), and `record`,
which counts it in the metrics and writes its usage-ledger line.

    speech         characters of `input` (Unicode code points) + seconds of audio produced
    transcription  seconds of input audio (measured from the upload) + characters of text returned
    translation    the same as transcription

Only a request that completed successfully is billable. A speech stream the client abandoned
midway is recorded with the units actually delivered and `completed: false`, and is not billed.
A request without a valid key writes no ledger line (the metrics still count it).
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

from aiohttp import web

from gateway.audio.meter import AudioMeter
from gateway.ledger import UsageRecord
from gateway.models import Price
from gateway.state import IDENTITY, LEDGER, METRICS, OUTCOME, REQUEST_ID, TABLE

SPEECH_ENDPOINT = "/v1/audio/speech"
TRANSCRIPT_ENDPOINTS = ("/v1/audio/transcriptions", "/v1/audio/translations")
BILLED_ENDPOINTS = frozenset({SPEECH_ENDPOINT, *TRANSCRIPT_ENDPOINTS})


MAX_ATTEMPTS = 32
"""Attempts listed in one access-log line; past it they are counted (`more_attempts`), so the line stays short."""


@dataclass(slots=True)
class Outcome:
    """What one request did: the route it took, the bytes, and the billable units. Created by the access-log
    stage, written only through the methods below (each by the one place that knows the fact), read once
    it is over by `bill` and `record` and by the access log."""

    endpoint: str
    started: float = field(default_factory=time.monotonic)
    public_model: str | None = None
    backend: str | None = None
    native_model: str | None = None
    voice: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    input_chars: int = 0
    """Speech: characters (code points) of `input`."""
    input_audio_seconds: float | None = None
    """Transcription: seconds of uploaded audio, measured once from the decoded file."""
    output_audio_seconds: float = 0.0
    """Speech: seconds of audio delivered to the client."""
    output_text_chars: int = 0
    """Transcription: characters of transcript text returned."""
    first_byte_at: float | None = None
    status: int | None = None
    """The response's status, once a handler produced one (a later disconnect does not change it)."""
    completed: bool = False
    """The answer reached the client whole (for streams: the last chunk was written)."""
    client_gone: bool = False
    """The client went away while its answer was being sent (recorded as 499, as nginx does)."""
    failed_after_first_byte: str | None = None
    """Why a stream was cut after its status had been sent, if it was."""
    meter: AudioMeter | None = None
    """Speech: measures the audio that went out (set only while metering is on)."""
    rejected_by: str | None = None
    """The limit or budget that refused the request (`key:requests/minute`, gateway/policy/admission.py)."""
    chunks: int | None = None
    """Transcription: the chunks a long upload was split into (gateway/handlers/long_audio.py); None: sent whole."""
    attempts: list[dict[str, object]] = field(default_factory=list)
    """Each attempt on a backend: {backend, outcome, ms} (gateway/handlers/routing.py), the first MAX_ATTEMPTS
    of them (a long upload's chunks make one or more each); `more_attempts` counts the others."""
    more_attempts: int = 0

    def attempted(self, backend: str, outcome: str, seconds: float) -> None:
        """One attempt on `backend` came to `outcome` (ok, a failure's reason, cancelled): the access log's."""
        if len(self.attempts) < MAX_ATTEMPTS:
            self.attempts.append({"backend": backend, "outcome": outcome, "ms": round(seconds * 1000, 1)})
        else:
            self.more_attempts += 1

    def route(self, public_model: str, backend: str, native_model: str, voice: str | None = None) -> None:
        self.public_model, self.backend, self.native_model, self.voice = (
            public_model, backend, native_model, voice)

    def sent(self, response: web.StreamResponse) -> None:
        """Note the status, and the body bytes of a response not streamed by its handler (those are sent
        after the middlewares)."""
        self.status = 499 if self.client_gone else response.status
        if self.bytes_out == 0:
            body = response.body if isinstance(response, web.Response) else None
            self.bytes_out = response.body_length or (len(body) if isinstance(body, bytes) else 0)

    def mark_first_byte(self) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()

    # -- what a request consumed, each written by the one place that knows it --------------------------------

    def speech_input(self, text: str, meter: AudioMeter | None) -> None:
        """Speech: the input's characters, and the meter of the audio that goes out (metering on)."""
        self.input_chars, self.meter = len(text), meter

    def upload_received(self, size: int) -> None:
        self.bytes_in = size

    def upload_measured(self, seconds: float) -> None:
        """Transcription: the upload's seconds, measured by the gateway before any backend call."""
        self.input_audio_seconds = seconds

    def upload_decoded(self, seconds: float) -> None:
        """The gateway's own decode of the upload found more audio than its packets said: bill that."""
        if seconds > (self.input_audio_seconds or 0.0):
            self.input_audio_seconds = seconds

    def text_returned(self, text: str) -> None:
        """Transcription: the transcript text the client gets (billed in characters)."""
        self.output_text_chars = len(text.strip())

    def audio_delivered(self, seconds: float) -> None:
        """Speech: seconds of audio that went out, measured from the bytes."""
        self.output_audio_seconds = seconds

    def wrote(self, size: int) -> None:
        """Body bytes that went out (a stream's, chunk by chunk, so a cut one counts what it sent)."""
        self.bytes_out += size

    def finished(self, body_bytes: int | None = None) -> None:
        """The client got the whole answer (`body_bytes`: a whole response's size, sent at once)."""
        if body_bytes is not None:
            self.bytes_out = body_bytes
        self.completed = True

    def client_left(self) -> None:
        """The client went away before it had the whole answer: recorded as 499, as nginx does."""
        self.client_gone = not self.completed

    def cut(self, reason: str) -> None:
        """The stream broke after its status line went out."""
        self.failed_after_first_byte = reason


@dataclass(frozen=True, slots=True)
class Bill:
    characters: int
    audio_seconds: float
    cost_usd: float | None
    billable: bool
    completed: bool


def bill(outcome: Outcome, status: int, price: Price | None) -> Bill:
    if outcome.endpoint == SPEECH_ENDPOINT:
        characters, seconds = outcome.input_chars, outcome.output_audio_seconds
    elif outcome.endpoint in TRANSCRIPT_ENDPOINTS:
        characters, seconds = outcome.output_text_chars, outcome.input_audio_seconds or 0.0
    else:
        return Bill(0, 0.0, None, billable=False, completed=status < 400)
    completed = outcome.completed and 200 <= status < 300 and outcome.failed_after_first_byte is None
    if not completed and outcome.first_byte_at is None:
        characters, seconds = 0, 0.0  # nothing reached the client
    cost = None if price is None else price.cost(characters, seconds)
    return Bill(characters, round(seconds, 3), cost, billable=completed, completed=completed)


async def measure_then_record(request: web.Request, endpoint: str, status: int) -> None:
    outcome: Outcome = request[OUTCOME]
    assert outcome.meter is not None
    outcome.audio_delivered(await outcome.meter.seconds())
    record(request, endpoint, status)


def record(request: web.Request, endpoint: str, status: int) -> None:
    """Bill the finished request once, then count it in the metrics and write its ledger record."""
    outcome: Outcome = request[OUTCOME]
    identity = request.get(IDENTITY)
    tenant = identity.tenant if identity else ""
    model = outcome.public_model or ""
    backend = outcome.backend or ""
    config = request[TABLE].config
    price = config.models[model].price if model in config.models else None
    billed = bill(outcome, status, price)
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.requests.labels(endpoint, model, backend, tenant, str(status)).inc()
        metrics.duration.labels(endpoint, model, backend).observe(time.monotonic() - outcome.started)
        metrics.request_bytes.labels(endpoint).inc(outcome.bytes_in or request.content_length or 0)
        metrics.response_bytes.labels(endpoint).inc(outcome.bytes_out)
        if outcome.first_byte_at is not None and endpoint == "/v1/audio/speech":
            metrics.first_byte.labels(model).observe(outcome.first_byte_at - outcome.started)
        if billed.billable:
            metrics.characters.labels(tenant, model).inc(billed.characters)
            metrics.audio_seconds.labels(tenant, model, endpoint).inc(billed.audio_seconds)
            if billed.cost_usd is not None:
                metrics.cost.labels(tenant, model).inc(billed.cost_usd)
    ledger = request.app.get(LEDGER)
    if ledger is not None and endpoint in BILLED_ENDPOINTS and identity is not None:  # no key, no ledger line
        ledger.write(UsageRecord(
            request_id=request[REQUEST_ID], time=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            tenant=identity.tenant if identity else None, key=identity.key_name if identity else None,
            endpoint=endpoint, model=outcome.public_model, backend=outcome.backend, native_model=outcome.native_model,
            voice=outcome.voice, characters=billed.characters, audio_seconds=billed.audio_seconds,
            cost_usd=billed.cost_usd, status=status, billable=billed.billable, completed=billed.completed,
            rejected_by=outcome.rejected_by, chunks=outcome.chunks))

