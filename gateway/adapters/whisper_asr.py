"""whisper-asr-webservice (ahmetoner/whisper-asr-webservice): transcriptions and translations via `POST /asr`.

The upload goes from the spool as the multipart field `audio_file`; every option is a query
parameter: `task` (transcribe | translate), `language`, `initial_prompt`, `output=json`,
`word_timestamps`, `encode=true` (the server decodes the upload with ffmpeg), `vad_filter`. The JSON
answer (text, language, segments with words) becomes a Transcript, from which the gateway renders
every OpenAI format. Its `Content-Type` is always text/plain, so the body itself is checked.

Not sent: the route's native model (the server loads one model at start, ASR_MODEL: map each public
model to its own deployment) and `temperature` (not a parameter of /asr). The server has no
authentication; a configured `api_key` is sent as `Authorization: Bearer` for a proxy in front of it.

Backend options: `word_timestamps` (default true; faster_whisper/openai_whisper engines give word
timings; false: the backend serves no `timestamp_granularities[]=word` request), `vad_filter` (default
false; faster_whisper engine only).
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import aiohttp

from gateway.adapters.base import (
    TRANSCRIPTION,
    TRANSLATION,
    AudioStream,
    Capabilities,
    SpeechJob,
    TranscriptionJob,
    check_options,
    transcribes_only,
    upstream_errors,
)
from gateway.adapters.engine_errors import Complaint
from gateway.adapters.http_engine import probe, raise_for_status, read_transcript, request_timeout
from gateway.adapters.redact import redact
from gateway.config import Backend
from gateway.errors import GatewayError, InvalidRequestError, Reason, UnsupportedError, UpstreamError
from gateway.languages import WHISPER_LANGUAGES, whisper_code
from gateway.transcript import Transcript
from gateway.transcript_json import parse_transcript

MAX_PROMPT_BYTES = 2048
"""Whisper conditions on the last 223 prompt tokens only; the tail kept here (~2 KB of UTF-8) holds more than
that and keeps the query string far below uvicorn's 16 KiB request-head limit."""
_CLIENT_FIELDS = {"language": "language", "initial_prompt": "prompt", "audio_file": "file"}
"""The /asr parameters that carry a client's field, by the OpenAI field's name."""
_OPTIONS = {"word_timestamps": True, "vad_filter": False}


class WhisperAsrAdapter:
    kind: ClassVar[str] = "whisper_asr"
    capabilities = Capabilities(
        tasks=frozenset({TRANSCRIPTION, TRANSLATION}),
        languages=WHISPER_LANGUAGES,
        word_timestamps=True,  # unless the backend sets `word_timestamps: false`
    )

    def __init__(self, backend: Backend, http: aiohttp.ClientSession) -> None:
        if not backend.url:
            raise ValueError(f"backends.{backend.name}.url: required for kind 'whisper_asr' "
                             "(the server's base URL, e.g. http://whisper-asr:9000)")
        check_options(backend, _OPTIONS)
        flags = {key: backend.options.get(key, default) for key, default in _OPTIONS.items()}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"backends.{backend.name}.{key}: expected true or false, got {value!r}")
        self.backend = backend
        self.http = http
        self.word_timestamps: bool = flags["word_timestamps"]
        if not self.word_timestamps:  # segments only: word requests go to another route, or are a 400
            self.capabilities = replace(type(self).capabilities, word_timestamps=False)
        self.vad_filter: bool = flags["vad_filter"]
        self.timeout = request_timeout(backend)
        self._in_flight = 0

    def _headers(self, request_id: str) -> dict[str, str]:
        headers = {"X-Request-ID": request_id, "Accept": "application/json, text/plain"}
        if self.backend.api_key:
            headers["Authorization"] = f"Bearer {self.backend.api_key}"
        return headers

    async def synthesize(self, job: SpeechJob) -> AudioStream:
        raise transcribes_only(self.backend)

    async def transcribe(self, job: TranscriptionJob) -> Transcript:
        params = self.params(job)
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("audio_file", job.upload.payload(), filename=job.upload.filename,
                       content_type=job.upload.content_type)
        self._in_flight += 1
        try:
            with upstream_errors(self.backend):
                response = await self.http.post(f"{self.backend.url}/asr", params=params, data=form,
                                                timeout=self.timeout, headers=self._headers(job.request_id))
            await raise_for_status(self.backend, response, refine=self._refine)
            body = await read_transcript(self.backend, response)
        finally:
            self._in_flight -= 1
        return self._transcript(body)

    def params(self, job: TranscriptionJob) -> dict[str, str]:
        """The query string of `POST /asr` for this job."""
        params = {"task": "translate" if job.task == "translate" else "transcribe", "output": "json",
                  "encode": "true"}
        language = self._language(job.language)
        if language:
            params["language"] = language
        if job.prompt and job.prompt.strip():
            params["initial_prompt"] = prompt_tail(job.prompt.strip())
        if self.word_timestamps:
            params["word_timestamps"] = "true"
        if self.vad_filter:
            params["vad_filter"] = "true"
        return params

    def _language(self, language: str | None) -> str | None:
        """Whisper's code for an ISO-639-1 code or tag ("pt-BR" -> "pt", "iw" -> "he"); 400 for one it lacks."""
        if not language:
            return None
        code = whisper_code(language)
        if code is None:
            raise UnsupportedError(f"Language '{language}' is not supported by backend '{self.backend.name}'.",
                                   param="language", code="unsupported_language")
        return code

    def _refine(self, said: Complaint) -> GatewayError | None:
        """FastAPI's 422 names the /asr parameter at fault: a client's field is the client's 400; any other
        parameter is the gateway's own, which no retry (and no client) can fix."""
        if said.status not in (400, 422) or not said.field:
            return None
        message = said.message or "invalid value"
        param = _CLIENT_FIELDS.get(said.field)
        if param:
            return InvalidRequestError(f"Backend '{self.backend.name}' rejected the request: {param}: {message}",
                                       param=param, reason=Reason.BACKEND_REJECTED)
        return UpstreamError(f"Backend '{self.backend.name}' rejected the gateway's "
                             f"'{redact(self.backend, said.field, 64)}' parameter: {message}",
                             reason=Reason.BACKEND_REJECTED, should_retry=False)

    def _transcript(self, body: bytes) -> Transcript:
        try:
            return parse_transcript(body)
        except ValueError:
            raise UpstreamError(f"Backend '{self.backend.name}' answered with a malformed transcript.",
                                reason=Reason.BAD_RESPONSE) from None

    async def ready(self) -> bool:
        """GET /openapi.json. The server transcribes on its event loop (1.7+: `async def asr` calls the model
        directly), so it answers nothing else meanwhile: while this adapter awaits a transcription, the
        engine is known to be up and is not probed."""
        if self._in_flight:
            return True
        return await probe(self.backend, self.http, f"{self.backend.url}/openapi.json", self._headers("readyz"))

    async def aclose(self) -> None:
        return None


def prompt_tail(prompt: str, limit: int = MAX_PROMPT_BYTES) -> str:
    """The end of `prompt` in at most `limit` bytes of UTF-8 (Whisper keeps the prompt's last tokens)."""
    raw = prompt.encode()
    return prompt if len(raw) <= limit else raw[-limit:].decode("utf-8", errors="ignore").lstrip()
