"""OpenAI-compatible upstreams (speaches, Kokoro-FastAPI, LocalAI, vLLM, OpenAI itself).

Rewrites `model`, `voice` and the credential, forwards every other field, and streams both ways:
the upload is sent from the spool in chunks, speech audio is relayed as it arrives. Option `realtime: true`: the
server also speaks OpenAI's realtime transcription WebSocket, and realtime sessions are relayed to it
(gateway/realtime/passthrough.py).
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
from gateway.adapters.readiness_probe import OPENAI_PROBE, probe_spec
from gateway.audio.formats import OPENAI_PCM_RATE, SPEECH_FORMATS, AudioFormat
from gateway.config import Backend
from gateway.errors import Reason, UpstreamError
from gateway.json_body import not_json
from gateway.settings import Limits
from gateway.transcript import Transcript

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
        check_options(backend, ("realtime", "probe"))
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
        body: dict[str, Any] = {**job.extra, "model": job.model, "voice": job.voice.id, "input": job.input,
                                "response_format": job.response_format, "speed": job.speed}
        if job.instructions is not None:
            body["instructions"] = job.instructions
        if job.stream_format != "audio":
            body["stream_format"] = job.stream_format
        sse = job.stream_format == "sse"
        with upstream_errors(self.backend):
            response = await self.http.post(
                f"{self.backend.url}/audio/speech", json=body, timeout=self.timeout,
                headers=self._headers(job.request_id, "text/event-stream" if sse else "application/octet-stream"))
        await raise_for_status(self.backend, response)
        ctype = response.content_type
        if ctype.startswith(("text/html", "application/json")) or (sse and ctype != "text/event-stream"):
            response.release()
            raise UpstreamError(f"Backend '{self.backend.name}' answered with {ctype} instead of audio.",
                                reason=Reason.BAD_RESPONSE)
        rate = OPENAI_PCM_RATE if job.response_format == "pcm" else None
        chunks = stream_body(self.backend, response)
        if sse:
            chunks = whole_events(self.backend, chunks)
        return AudioStream(AudioFormat(job.response_format, rate), chunks, speed_applied=True, sse=sse)

    async def transcribe(self, job: TranscriptionJob) -> Transcript | Passthrough:
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("model", job.model)
        for name, value in self._fields(job):
            form.add_field(name, value)
        form.add_field("file", job.upload.payload(), filename=job.upload.filename,
                       content_type=job.upload.content_type)
        path = "translations" if job.task == "translate" else "transcriptions"
        with upstream_errors(self.backend):
            response = await self.http.post(f"{self.backend.url}/audio/{path}", data=form, timeout=self.timeout,
                                            headers=self._headers(job.request_id, "application/json"))
        await raise_for_status(self.backend, response)
        if job.stream and response.content_type == "text/event-stream":
            events = whole_events(self.backend, stream_body(self.backend, response, MAX_TRANSCRIPT_BYTES))
            return Passthrough("text/event-stream", chunks=events)
        body = await read_transcript(self.backend, response)
        return Passthrough(self._check_transcript(job.response_format, body, response.content_type), body=body)

    def _fields(self, job: TranscriptionJob) -> list[tuple[str, str]]:
        fields: list[tuple[str, str]] = [("response_format", job.response_format)]
        optional = {"language": job.language, "prompt": job.prompt,
                    "temperature": None if job.temperature is None else str(job.temperature)}
        fields += [(k, v) for k, v in optional.items() if v is not None]
        fields += [("timestamp_granularities[]", g) for g in job.timestamp_granularities]
        fields += [("include[]", i) for i in job.include]
        if job.stream:
            fields.append(("stream", "true"))
        return fields + list(job.extra)

    def _check_transcript(self, fmt: str, body: bytes, content_type: str) -> str:
        """The content type to relay, once the body is known to be what `fmt` promises (JSON that the SDK can
        read: Python's `NaN`/`Infinity` are not JSON)."""
        if fmt in _JSON_FORMATS:
            try:
                parsed = json.loads(body, parse_constant=not_json)
            except (ValueError, RecursionError):
                parsed = None
            if not isinstance(parsed, dict) or not isinstance(parsed.get("text"), str):
                raise UpstreamError(f"Backend '{self.backend.name}' answered with a malformed transcript.",
                                    reason=Reason.BAD_RESPONSE)
            return "application/json"
        if content_type.startswith("text/html") or content_type == "application/json":
            raise UpstreamError(f"Backend '{self.backend.name}' answered with {content_type} instead of {fmt}.",
                                reason=Reason.BAD_RESPONSE)
        return "text/plain; charset=utf-8"

    async def ready(self) -> bool:
        return await self.probe.ask(self.backend, self.http, self._headers("readyz", "*/*"))

    async def aclose(self) -> None:
        return None
