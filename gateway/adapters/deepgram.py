"""Deepgram: pre-recorded speech to text (`POST /v1/listen`) and Aura text to speech (`POST /v1/speak`).

Speech to text sends the spooled upload as the raw request body with the client's Content-Type
(Deepgram sniffs containerized audio itself; no multipart), options as query parameters, and reads
`results.channels[0].alternatives[0]` (transcript, words) and `results.utterances` (segments).
Deepgram does not translate, so this backend serves transcriptions only.

Text to speech: an Aura *model* is the voice. The native voice (`job.voice.id`, e.g.
`aura-2-thalia-en`) is sent as the `model` query parameter; a route model containing `{voice}`
(e.g. `aura-2-{voice}-en`) is a template the native voice is put into, so the voice table may name
just `thalia`; any other route model is only a label. All six OpenAI formats are asked for natively
(`encoding`/`container`/`sample_rate`). Inputs longer than Deepgram's per-request limit are cut at
sentence ends and spoken piece by piece as 24 kHz PCM, which the gateway encodes. Speed is left to
the gateway (REST `speed` is an early-access, English-only feature).

Live transcripts (`transcribe_live`, the realtime session's deltas): the same model over Deepgram's streaming
WebSocket, final results yielded as they come (gateway/adapters/deepgram_live.py).

Backend keys: `url` (default https://api.deepgram.com; a self-hosted Deepgram works too), `api_key`
(sent as `Authorization: Token <key>`; omit for self-hosted), `listen_params` (extra query parameters
for /v1/listen, e.g. `{diarize: true, keyterm: Deepgram}`), `max_input_chars` (default 2000).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any, ClassVar

import aiohttp

from gateway.adapters.base import (
    SPEECH,
    TRANSCRIPTION,
    AudioStream,
    Capabilities,
    SpeechJob,
    TranscriptionJob,
    check_options,
    upstream_errors,
)
from gateway.adapters.deepgram_live import listen_live, live_params
from gateway.adapters.http_engine import probe, raise_for_status, read_transcript, request_timeout, stream_body
from gateway.audio.formats import OPENAI_PCM_RATE, SPEECH_FORMATS, AudioFormat, pcm
from gateway.config import Backend
from gateway.errors import Reason, UpstreamError
from gateway.transcript import Segment, Transcript, Word, seconds

DEFAULT_URL = "https://api.deepgram.com"
MAX_INPUT_CHARS = 2000
"""Characters per /v1/speak request (Deepgram's documented REST limit, as far as known)."""
_OPTIONS = frozenset({"listen_params", "max_input_chars"})
# OpenAI response_format -> /v1/speak query (Deepgram's "Audio Format Combinations")
SPEAK_FORMATS: dict[str, dict[str, str]] = {
    "mp3": {"encoding": "mp3"},
    "opus": {"encoding": "opus", "container": "ogg"},
    "aac": {"encoding": "aac"},
    "flac": {"encoding": "flac"},
    "wav": {"encoding": "linear16", "container": "wav", "sample_rate": str(OPENAI_PCM_RATE)},
    "pcm": {"encoding": "linear16", "container": "none", "sample_rate": str(OPENAI_PCM_RATE)},
}
_SENTENCE_END = re.compile(r"[.!?;:\u2026\u3002\uff01\uff1f][\"')\]\u201d\u2019]*\s+")


class DeepgramAdapter:
    kind: ClassVar[str] = "deepgram"
    capabilities = Capabilities(
        tasks=frozenset({SPEECH, TRANSCRIPTION}),
        speech_formats=frozenset(SPEECH_FORMATS),
        word_timestamps=True,
        live_transcript=True,
    )

    def __init__(self, backend: Backend, http: aiohttp.ClientSession) -> None:
        where = f"backends.{backend.name}"
        check_options(backend, _OPTIONS)
        params = backend.options.get("listen_params") or {}
        if not isinstance(params, Mapping) or not all(isinstance(v, str | int | float | bool) for v in params.values()):
            raise ValueError(f"{where}.listen_params: expected a mapping of query parameters to scalar values")
        self.listen_params = {str(k): _query_value(v) for k, v in params.items()}
        limit = backend.options.get("max_input_chars", MAX_INPUT_CHARS)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 100:
            raise ValueError(f"{where}.max_input_chars: expected an integer of at least 100")
        self.max_input_chars = limit
        self.backend = backend
        self.http = http
        self.url = (backend.url or DEFAULT_URL).removesuffix("/v1")
        self.timeout = request_timeout(backend)

    def _headers(self, accept: str, content_type: str | None = None) -> dict[str, str]:
        # identity: the gateway's session does not decompress, and audio is relayed byte for byte
        headers = {"Accept": accept, "Accept-Encoding": "identity"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.backend.api_key:
            headers["Authorization"] = f"Token {self.backend.api_key}"
        return headers

    # -- text to speech ------------------------------------------------------------------------------

    async def synthesize(self, job: SpeechJob) -> AudioStream:
        pieces = split_text(job.input, self.max_input_chars)
        fmt = job.response_format if len(pieces) == 1 else "pcm"  # pieces of PCM join seamlessly
        model = job.model.replace("{voice}", job.voice.id) if "{voice}" in job.model else job.voice.id
        params = {"model": model, **SPEAK_FORMATS[fmt]}
        first = await self._speak(pieces[0], params)
        audio_format = pcm(OPENAI_PCM_RATE) if fmt == "pcm" else AudioFormat(fmt)
        return AudioStream(audio_format, self._audio(first, pieces[1:], params))

    async def _speak(self, text: str, params: dict[str, str]) -> aiohttp.ClientResponse:
        with upstream_errors(self.backend):
            response = await self.http.post(f"{self.url}/v1/speak", params=params, json={"text": text},
                                            headers=self._headers("audio/*", "application/json"),
                                            timeout=self.timeout)
        await raise_for_status(self.backend, response)
        if response.content_type.startswith(("text/", "application/json")):
            response.release()
            raise UpstreamError(f"Backend '{self.backend.name}' answered with {response.content_type} "
                                "instead of audio.", reason=Reason.BAD_RESPONSE)
        return response

    async def _audio(self, response: aiohttp.ClientResponse, rest: list[str],
                     params: dict[str, str]) -> AsyncIterator[bytes]:
        """The first answer's body as it arrives, then each further piece's, one request at a time."""
        while True:
            async for chunk in stream_body(self.backend, response):
                yield chunk
            if not rest:
                return
            response = await self._speak(rest.pop(0), params)

    # -- speech to text ------------------------------------------------------------------------------

    async def transcribe(self, job: TranscriptionJob) -> Transcript:
        params = {"model": job.model, "smart_format": "true", "punctuate": "true", "utterances": "true",
                  **self.listen_params}
        if job.language:
            params["language"] = _bcp47(job.language)
            params.pop("detect_language", None)
        elif "language" not in params:
            params.setdefault("detect_language", "true")
        content_type = job.upload.content_type
        if not content_type or content_type.startswith(("application/json", "text/")):
            content_type = "application/octet-stream"  # a JSON type would ask Deepgram to fetch a URL
        with upstream_errors(self.backend):
            response = await self.http.post(f"{self.url}/v1/listen", params=params, data=job.upload.payload(),
                                            headers=self._headers("application/json", content_type),
                                            timeout=self.timeout)
        await raise_for_status(self.backend, response)
        body = await read_transcript(self.backend, response)
        if response.content_type != "application/json":
            raise self._malformed()
        return self._transcript(body, job.language)

    async def transcribe_live(self, job: TranscriptionJob) -> AsyncIterator[str]:
        """The transcript as Deepgram finalizes it, over `wss://<host>/v1/listen` (gateway/adapters/deepgram_live.py;
        `listen_params` are not sent: several are pre-recorded only and would fail the upgrade)."""
        params = live_params(job.model, _bcp47(job.language) if job.language else None)
        async with aclosing(listen_live(self.backend, self.http, f"{self.url}/v1/listen",
                                        self._headers("application/json"), params, job)) as pieces:
            async for piece in pieces:
                yield piece

    def _malformed(self) -> UpstreamError:
        return UpstreamError(f"Backend '{self.backend.name}' answered with a malformed transcript.",
                             reason=Reason.BAD_RESPONSE)

    def _transcript(self, body: bytes, language: str | None) -> Transcript:
        try:
            parsed: Any = json.loads(body)
            channel = parsed["results"]["channels"][0]
            best = channel["alternatives"][0]
            text = best["transcript"]
            words = _words(best.get("words") or ())
            segments = tuple(Segment(seconds(u["start"]), max(seconds(u["start"]), seconds(u["end"])),
                                     str(u["transcript"]).strip(), _words(u.get("words") or ()))
                             for u in parsed["results"].get("utterances") or ())
            duration = _duration((parsed.get("metadata") or {}).get("duration"))
            detected = channel.get("detected_language")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
            raise self._malformed() from None
        if not isinstance(text, str):
            raise self._malformed()
        return Transcript(text=text.strip(), language=language or (detected if isinstance(detected, str) else None),
                          duration=duration, segments=segments, words=words)

    async def ready(self) -> bool:
        """GET /v1/projects: authenticated, free. 403 is a key without management scope, still usable."""
        return await probe(self.backend, self.http, f"{self.url}/v1/projects", self._headers("application/json"),
                           up=lambda status: status < 300 or status == 403)

    async def aclose(self) -> None:
        return None


def _bcp47(language: str) -> str:
    """Deepgram's form of a language code; the gateway lower-cases it: pt-br -> pt-BR."""
    first, _, region = language.replace("_", "-").partition("-")
    return f"{first}-{region.upper() if len(region) == 2 else region}" if region else first


def _words(raw: Any) -> tuple[Word, ...]:
    """The words with usable timings (the renderers time the text around any other)."""
    words = []
    for w in raw:
        try:
            start, end = seconds(w["start"]), seconds(w["end"])
        except ValueError:
            continue
        words.append(Word(str(w.get("punctuated_word") or w["word"]), start, max(start, end)))
    return tuple(words)


def _duration(value: Any) -> float | None:
    try:
        return seconds(value)
    except ValueError:
        return None


def _query_value(value: str | int | float | bool) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def split_text(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters: cut after the last sentence end that fits,
    else at the last space, else hard."""
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[: limit + 1]
        ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.start() < limit]
        cut = ends[-1] if ends else window.rfind(" ")
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    return [*pieces, rest] if rest or not pieces else pieces
