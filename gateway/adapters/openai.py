"""OpenAI-compatible upstreams (speaches, Kokoro-FastAPI, LocalAI, vLLM, OpenAI itself).

Rewrites `model`, `voice` and the credential, forwards every other field, and streams both ways:
the upload is sent from the spool in chunks, speech audio is relayed as it arrives. Option `realtime: true`: the
server also speaks OpenAI's realtime transcription WebSocket, and realtime sessions are relayed to it
(gateway/realtime/passthrough.py). Options `capabilities` and `fields`: what the server really speaks and the
names it reads (gateway/adapters/openai_capabilities.py); the server is asked only for what it declared, and the
core fills the rest (a raw audio answer to an SSE request is framed, a transcript format it lacks rendered from
its JSON).
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, ClassVar
from urllib.parse import urlsplit

import aiohttp

from gateway.adapters.base import (
    SPEECH,
    TRANSCRIPTION,
    TRANSLATION,
    AudioStream,
    Capabilities,
    Passthrough,
    SpeechJob,
    TranscriptionJob,
    check_options,
    upstream_errors,
)
from gateway.adapters.events import whole_events
from gateway.adapters.http_engine import (
    MAX_TRANSCRIPT_BYTES,
    raise_for_status,
    read_transcript,
    request_timeout,
    stream_body,
)
from gateway.adapters.openai_capabilities import declared
from gateway.adapters.readiness_probe import OPENAI_PROBE, probe_spec
from gateway.audio.formats import OPENAI_PCM_RATE, SPEECH_FORMATS, AudioFormat
from gateway.config import Backend
from gateway.errors import InvalidRequestError, Reason, UnsupportedError, UpstreamError
from gateway.json_body import not_json
from gateway.settings import Limits
from gateway.transcript import Transcript
from gateway.transcript_json import normalized_body, parse_transcript

_JSON_FORMATS = ("json", "verbose_json", "diarized_json")
OPENAI_HOST = "api.openai.com"
OPENAI_MAX_UPLOAD = 26_214_400
"""OpenAI's transcription upload limit ("File uploads are currently limited to 25 MB"; the body cap it enforces
is 26,214,400 bytes: ../shared/research/openai-audio-api.md)."""


class OpenAIAdapter:
    kind: ClassVar[str] = "openai"
    capabilities = Capabilities(
        tasks=frozenset({SPEECH, TRANSCRIPTION, TRANSLATION}),
        speech_formats=frozenset(SPEECH_FORMATS),
        native_speed=(0.25, 4.0),
        speech_sse=True,
        transcript_formats=frozenset({"json", "text", "srt", "verbose_json", "vtt", "diarized_json"}),
        word_timestamps=True,  # relayed as the server gives them (OpenAI's own API does)
        chunking_strategy=True,
    )

    def __init__(self, backend: Backend, http: aiohttp.ClientSession) -> None:
        if not backend.url:
            raise ValueError(f"backends.{backend.name}.url: required for kind 'openai'")
        check_options(backend, ("realtime", "capabilities", "fields", "probe"))
        self.server = declared(backend)
        self.capabilities = self.server.capabilities(self.capabilities)
        self.probe = probe_spec(backend, OPENAI_PROBE)
        self.backend = backend
        self.http = http
        self.timeout = request_timeout(backend)
        if urlsplit(backend.url).hostname == OPENAI_HOST:  # OpenAI's own limit, documented; others vary
            self.capabilities = replace(self.capabilities, limits=Limits(max_upload_bytes=OPENAI_MAX_UPLOAD))
        realtime = backend.options.get("realtime", False)
        if not isinstance(realtime, bool):
            raise ValueError(f"backends.{backend.name}.realtime: expected true or false, got {realtime!r}")
        if realtime:  # it serves OpenAI's realtime WebSocket: sessions are relayed to it (gateway/realtime/)
            self.capabilities = replace(self.capabilities, realtime=True)

    def _headers(self, request_id: str, accept: str) -> dict[str, str]:
        headers = {"X-Request-ID": request_id, "Accept": accept}
        if self.backend.api_key:
            headers["Authorization"] = f"Bearer {self.backend.api_key}"
        return headers

    async def synthesize(self, job: SpeechJob) -> AudioStream:
        limit = self.server.max_input_chars
        if limit is not None and len(job.input) > limit:
            raise InvalidRequestError(
                f"Invalid 'input': string too long. Expected a string with maximum length {limit}, but got a "
                f"string with length {len(job.input)} instead.", param="input", code="string_above_max_length")
        body: dict[str, Any] = {**job.extra, "model": job.model, "voice": job.voice.id, "input": job.input,
                                "response_format": job.response_format, "speed": job.speed}
        if job.instructions is not None:
            body["instructions"] = job.instructions
        # SSE only for the formats it declared: for the others raw audio, which the core frames
        sse = job.stream_format == "sse" and job.response_format in self.server.sse_formats
        if sse:
            body["stream_format"] = "sse"
        body = {self.server.renamed(k): v for k, v in body.items()}
        with upstream_errors(self.backend):
            response = await self.http.post(
                f"{self.backend.url}/audio/speech", json=body, timeout=self.timeout,
                headers=self._headers(job.request_id, "text/event-stream" if sse else "application/octet-stream"))
        await raise_for_status(self.backend, response)
        ctype = response.content_type
        if ctype.startswith(("text/html", "application/json")):
            response.release()
            raise UpstreamError(f"Backend '{self.backend.name}' answered with {ctype} instead of audio.",
                                reason=Reason.BAD_RESPONSE)
        sse = sse and ctype == "text/event-stream"  # raw audio to an SSE request (undeclared): the core frames it
        rate = OPENAI_PCM_RATE if job.response_format == "pcm" else None
        chunks = stream_body(self.backend, response)
        if sse:
            chunks = whole_events(self.backend, chunks)
        return AudioStream(AudioFormat(job.response_format, rate), chunks, speed_applied=True, sse=sse)

    async def transcribe(self, job: TranscriptionJob) -> Transcript | Passthrough:
        languages = self.capabilities.languages
        if job.language and languages is not None and job.language.lower() not in languages:
            raise UnsupportedError(f"Language '{job.language}' is not supported by backend '{self.backend.name}'.",
                                   param="language", code="unsupported_language")
        fmt = self.server.transcript_format(job.response_format)
        form = aiohttp.FormData(quote_fields=False)
        rename = self.server.renamed
        form.add_field(rename("model"), job.model)
        for name, value in self._fields(job, fmt):
            form.add_field(rename(name), value)
        form.add_field(rename("file"), job.upload.payload(), filename=job.upload.filename,
                       content_type=job.upload.content_type)
        # an English-only server without translations is asked to transcribe (Capabilities.can)
        path = "translations" if job.task == "translate" and self.server.translation else "transcriptions"
        with upstream_errors(self.backend):
            response = await self.http.post(f"{self.backend.url}/audio/{path}", data=form, timeout=self.timeout,
                                            headers=self._headers(job.request_id, "application/json"))
        await raise_for_status(self.backend, response)
        if job.stream and response.content_type == "text/event-stream":
            events = whole_events(self.backend, stream_body(self.backend, response, MAX_TRANSCRIPT_BYTES))
            return Passthrough("text/event-stream", chunks=events)
        body = await read_transcript(self.backend, response)
        if fmt == job.response_format:
            return self._relayed(fmt, body, response.content_type)
        try:  # a format it lacks: the core renders it from the JSON it has
            return parse_transcript(body)
        except ValueError:
            raise UpstreamError(f"Backend '{self.backend.name}' answered with a malformed transcript.",
                                reason=Reason.BAD_RESPONSE) from None

    def _fields(self, job: TranscriptionJob, fmt: str) -> list[tuple[str, str]]:
        fields: list[tuple[str, str]] = [("response_format", fmt)]
        optional = {"language": job.language, "prompt": job.prompt,
                    "temperature": None if job.temperature is None else str(job.temperature)}
        fields += [(k, v) for k, v in optional.items() if v is not None]
        # only what it declared: a server that ignores the field gets none (a word request never reaches it)
        fields += [("timestamp_granularities[]", g) for g in job.timestamp_granularities
                   if g in self.server.granularities]
        fields += [("include[]", i) for i in job.include]
        if job.stream and self.server.transcript_stream:
            fields.append(("stream", "true"))
        return fields + list(job.extra)

    def _relayed(self, fmt: str, body: bytes, content_type: str) -> Passthrough:
        """The server's answer in the client's format, once it is known to be what `fmt` promises (JSON that the
        SDK can read: Python's `NaN`/`Infinity` are not JSON), `json`/`verbose_json` normalized as OpenAI's."""
        if fmt in _JSON_FORMATS:
            try:
                parsed = json.loads(body, parse_constant=not_json)
            except (ValueError, RecursionError):
                parsed = None
            if not isinstance(parsed, dict) or not isinstance(parsed.get("text"), str):
                raise UpstreamError(f"Backend '{self.backend.name}' answered with a malformed transcript.",
                                    reason=Reason.BAD_RESPONSE)
            return Passthrough("application/json", body=body if fmt == "diarized_json" else normalized_body(parsed))
        if content_type.startswith("text/html") or content_type == "application/json":
            raise UpstreamError(f"Backend '{self.backend.name}' answered with {content_type} instead of {fmt}.",
                                reason=Reason.BAD_RESPONSE)
        return Passthrough("text/plain; charset=utf-8", body=body)

    async def ready(self) -> bool:
        return await self.probe.ask(self.backend, self.http, self._headers("readyz", "*/*"))

    async def aclose(self) -> None:
        return None
