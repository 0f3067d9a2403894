"""Azure AI Speech: text to speech over the SSML REST API, speech to text over the fast-transcription API.

Speech: `POST {tts}/cognitiveservices/v1` with SSML built here (the input XML-escaped, the native voice
as `<voice name>`, OpenAI `speed` 0.5-2.0 as `<prosody rate='+100.00%'>`; other speeds are left to
the gateway) and `X-Microsoft-OutputFormat` chosen so mp3, opus, wav and pcm pass through as Azure
makes them; aac and flac are asked for as raw 24 kHz PCM and encoded by the gateway. The body is
relayed as it arrives.

Transcription: `POST {stt}/speechtotext/transcriptions:transcribe?api-version=2024-11-15`, multipart
`audio` (the upload as the client sent it) and `definition` (JSON: `locales` from the client's
`language`, plus the backend's `definition` settings). Phrases become segments, their words words; times
are read from `offsetMilliseconds`/`durationMilliseconds` or, as the preview API's documentation names
them, `offset`/`duration` (milliseconds too).
Azure does not translate here, so this backend serves transcriptions only.

Backend keys: `region` (e.g. westeurope: tts at https://{region}.tts.speech.microsoft.com, stt at
https://{region}.api.cognitive.microsoft.com) or `url` (overrides the region for both: a container,
a proxy or a test double); `stt_url` (overrides the transcription host only); `api_key` (sent as
`Ocp-Apim-Subscription-Key`); `locales` (language -> locale, over LOCALES); `default_locales`
(candidates when the client names no language; none: Azure identifies the language itself);
`definition` (extra fast-transcription settings, e.g. `{profanityFilterMode: None}`); `api_version`;
`user_agent`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar
from xml.sax.saxutils import escape

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
from gateway.adapters.http_engine import probe, raise_for_status, read_transcript, request_timeout, stream_body
from gateway.audio.formats import OPENAI_PCM_RATE, AudioFormat, pcm
from gateway.config import Backend
from gateway.errors import Reason, UpstreamError
from gateway.transcript import Segment, Transcript, Word, seconds

API_VERSION = "2024-11-15"
USER_AGENT = "openai-audio-gateway"
OUTPUT_FORMATS = {
    "mp3": "audio-24khz-96kbitrate-mono-mp3",
    "opus": "ogg-24khz-16bit-mono-opus",
    "wav": "riff-24khz-16bit-mono-pcm",
    "pcm": "raw-24khz-16bit-mono-pcm",
}
LOCALES = {
    "ar": "ar-EG", "ca": "ca-ES", "cs": "cs-CZ", "da": "da-DK", "de": "de-DE", "el": "el-GR", "en": "en-US",
    "es": "es-ES", "fi": "fi-FI", "fr": "fr-FR", "he": "he-IL", "hi": "hi-IN", "hu": "hu-HU", "id": "id-ID",
    "it": "it-IT", "ja": "ja-JP", "ko": "ko-KR", "nb": "nb-NO", "no": "nb-NO", "nl": "nl-NL", "pl": "pl-PL",
    "pt": "pt-BR", "ro": "ro-RO", "ru": "ru-RU", "sk": "sk-SK", "sv": "sv-SE", "ta": "ta-IN", "th": "th-TH",
    "tr": "tr-TR", "uk": "uk-UA", "vi": "vi-VN", "zh": "zh-CN",
}  # fmt: skip
"""ISO-639-1 -> the locale asked for when a client names only a language."""
_OPTIONS = frozenset({"region", "stt_url", "locales", "default_locales", "definition", "api_version", "user_agent"})
_REGION = re.compile(r"^[a-z0-9]+$")
_VOICE_LOCALE = re.compile(r"^([a-z]{2,3}-[A-Z]{2}|[a-z]{2,3}-[A-Z][a-z]{3}-[A-Z]{2})-")
_NOT_XML = {c: None for c in range(32) if c not in (9, 10, 13)}  # control characters XML 1.0 forbids


def ssml(text: str, voice: str, speed: float = 1.0) -> str:
    """A <speak> document saying `text` (escaped) with `voice`, at `speed` times the voice's rate."""
    match = _VOICE_LOCALE.match(voice)
    body = escape(text.translate(_NOT_XML))
    if speed != 1.0:
        body = f"<prosody rate='{(speed - 1) * 100:+.2f}%'>{body}</prosody>"
    name = escape(voice.translate(_NOT_XML), {"'": "&apos;", '"': "&quot;"})
    return (f"<speak version='1.0' xmlns='http://www.w3.org/2001/10/synthesis' "
            f"xml:lang='{match.group(1) if match else 'en-US'}'><voice name='{name}'>{body}</voice></speak>")


class AzureSpeechAdapter:
    kind: ClassVar[str] = "azure_speech"
    capabilities = Capabilities(
        tasks=frozenset({SPEECH, TRANSCRIPTION}),
        speech_formats=frozenset(OUTPUT_FORMATS),
        native_speed=(0.5, 2.0),  # SSML prosody: "rate changes should be within 0.5 to 2 times"
        word_timestamps=True,
    )

    def __init__(self, backend: Backend, http: aiohttp.ClientSession) -> None:
        where, opts = f"backends.{backend.name}", backend.options
        check_options(backend, _OPTIONS)
        region = opts.get("region")
        if region is not None and not (isinstance(region, str) and _REGION.match(region)):
            raise ValueError(f"{where}.region: expected an Azure region name such as 'westeurope'")
        if not backend.url and not region:
            raise ValueError(f"{where}.region: required for kind 'azure_speech' unless url is given")
        stt_url = opts.get("stt_url")
        if stt_url is not None and not (isinstance(stt_url, str) and re.match(r"^https?://", stt_url)):
            raise ValueError(f"{where}.stt_url: expected an http(s):// URL")
        self.tts_url = backend.url or f"https://{region}.tts.speech.microsoft.com"
        self.stt_url = (stt_url or "").rstrip("/") or backend.url or f"https://{region}.api.cognitive.microsoft.com"
        locales = opts.get("locales") or {}
        if not isinstance(locales, Mapping) or not all(isinstance(v, str) for v in locales.values()):
            raise ValueError(f"{where}.locales: expected a mapping of language codes to locales (en: en-GB)")
        self.locales = {**LOCALES, **{str(k).lower(): v for k, v in locales.items()}}
        defaults = opts.get("default_locales") or []
        if not isinstance(defaults, list) or not all(isinstance(v, str) for v in defaults):
            raise ValueError(f"{where}.default_locales: expected a list of locales")
        self.default_locales: list[str] = list(defaults)
        definition = opts.get("definition") or {}
        if not isinstance(definition, Mapping):
            raise ValueError(f"{where}.definition: expected a mapping of fast-transcription settings")
        self.definition = dict(definition)
        self.api_version = str(opts.get("api_version") or API_VERSION)
        self.user_agent = str(opts.get("user_agent") or USER_AGENT)
        self.backend = backend
        self.http = http
        self.timeout = request_timeout(backend)

    def _headers(self, **extra: str) -> dict[str, str]:
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity", **extra}
        if self.backend.api_key:
            headers["Ocp-Apim-Subscription-Key"] = self.backend.api_key
        return headers

    async def synthesize(self, job: SpeechJob) -> AudioStream:
        fmt = job.response_format if job.response_format in OUTPUT_FORMATS else "pcm"
        headers = self._headers(**{"Content-Type": "application/ssml+xml",
                                   "X-Microsoft-OutputFormat": OUTPUT_FORMATS[fmt]})
        with upstream_errors(self.backend):
            response = await self.http.post(f"{self.tts_url}/cognitiveservices/v1", headers=headers,
                                            data=ssml(job.input, job.voice.id, job.speed).encode(),
                                            timeout=self.timeout)
        await raise_for_status(self.backend, response)
        if response.content_type.startswith(("text/", "application/json")):
            response.release()
            raise UpstreamError(f"Backend '{self.backend.name}' answered with {response.content_type} "
                                "instead of audio.", reason=Reason.BAD_RESPONSE)
        audio = pcm(OPENAI_PCM_RATE) if fmt == "pcm" else AudioFormat(fmt)
        return AudioStream(audio, stream_body(self.backend, response), speed_applied=True)

    async def transcribe(self, job: TranscriptionJob) -> Transcript:
        definition = dict(self.definition)
        locales = self._locales(job.language)
        if locales:
            definition["locales"] = locales
        form = aiohttp.FormData(quote_fields=False)
        form.add_field("audio", job.upload.payload(), filename=job.upload.filename,
                       content_type=job.upload.content_type)
        form.add_field("definition", json.dumps(definition))
        with upstream_errors(self.backend):
            response = await self.http.post(f"{self.stt_url}/speechtotext/transcriptions:transcribe",
                                            params={"api-version": self.api_version}, data=form,
                                            headers=self._headers(Accept="application/json"),
                                            timeout=self.timeout)
        await raise_for_status(self.backend, response)
        body = await read_transcript(self.backend, response)
        if response.content_type != "application/json":
            raise self._malformed()
        return self._transcript(body, job.language)

    def _locales(self, language: str | None) -> list[str]:
        """The client's language as Azure locales; an unknown bare code lets Azure identify the language."""
        if not language:
            return self.default_locales
        code = language.strip().replace("_", "-")
        if "-" in code:  # a locale already; the gateway lower-cases it: pt-pt -> pt-PT, zh-hans-cn -> zh-Hans-CN
            first, *rest = code.split("-")
            return ["-".join([first.lower(), *(p.upper() if len(p) == 2 else p.title() for p in rest)])]
        locale = self.locales.get(code.lower())
        return [locale] if locale else []

    def _malformed(self) -> UpstreamError:
        return UpstreamError(f"Backend '{self.backend.name}' answered with a malformed transcript.",
                             reason=Reason.BAD_RESPONSE)

    def _transcript(self, body: bytes, language: str | None) -> Transcript:
        try:
            parsed: Any = json.loads(body)
            phrases = sorted(parsed.get("phrases") or (), key=lambda p: _span(p)[0])
            segments = tuple(Segment(*_span(p), str(p["text"]), _words(p.get("words") or ())) for p in phrases)
            combined = parsed.get("combinedPhrases") or ()
            text = " ".join(str(c["text"]).strip() for c in combined) or " ".join(s.text for s in segments)
            duration = _milliseconds(parsed, "duration")
            detected = next((p["locale"] for p in phrases if isinstance(p.get("locale"), str)), None)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # JSON nested past the limit
            raise self._malformed() from None
        return Transcript(text=text.strip(), language=language or detected, segments=segments,
                          duration=_duration(duration))

    async def ready(self) -> bool:
        """GET the voice list with the key: authenticated and free."""
        return await probe(self.backend, self.http, f"{self.tts_url}/cognitiveservices/voices/list", self._headers())

    async def aclose(self) -> None:
        return None


def _span(item: Any) -> tuple[float, float]:
    """(start, end) in seconds of a phrase or word; ValueError unless both are finite."""
    start = seconds(_milliseconds(item, "offset")) / 1000
    return start, seconds(start + seconds(_milliseconds(item, "duration")) / 1000)  # 1e308 + 1e308 is inf


def _milliseconds(item: Any, name: str) -> Any:
    """`<name>Milliseconds` (API 2024-11-15), else `<name>`: Microsoft's documentation of the 2024-05-15-preview
    answer names the same milliseconds `offset`/`duration` (tests/fixtures/azure_speech/SOURCES.md)."""
    value = item.get(f"{name}Milliseconds")
    return item.get(name) if value is None else value


def _words(raw: Any) -> tuple[Word, ...]:
    """The words with usable timings (the renderers time the text around any other)."""
    words = []
    for w in raw:
        try:
            words.append(Word(str(w["text"]), *_span(w)))
        except ValueError:
            continue
    return tuple(words)


def _duration(milliseconds: Any) -> float | None:
    try:
        return seconds(milliseconds) / 1000
    except ValueError:
        return None
